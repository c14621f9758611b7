"""Tokenizers: the vendored GPT-2 offline, the tiktoken fast path against HF, local folders, hub ids offline."""

from __future__ import annotations

import os
import time

import pytest

from distclm import hub
from distclm.data.tokenize import PROBE_TEXT, load_tokenizer
from distclm.errors import UserError
from tests.support.data import encode_all, pydoc_texts


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2", num_threads=2)


def test_vendored_gpt2_known_ids(gpt2):
    assert gpt2.encode_batch(["Hello world", " the", "the"]) == [[15496, 995], [262], [1169]]
    assert gpt2.eos_token_id == 50256
    assert gpt2.vocab_size == 50257
    assert gpt2.max_length == 1024
    assert gpt2.hf.decode([15496, 995]) == "Hello world"
    assert len(gpt2.sha256) == 64


def test_fast_path_equals_hf_on_pydoc(gpt2, hf_gpt2):
    assert gpt2.backend == "tiktoken"
    texts = pydoc_texts()
    assert gpt2.encode_batch(texts) == encode_all(hf_gpt2, texts)


def test_hf_backend_gives_the_same_ids(gpt2):
    slow = load_tokenizer("gpt2", allow_fast_path=False)
    assert slow.backend == "hf"
    texts = pydoc_texts()[:10] + [PROBE_TEXT, "", "  leading and trailing  "]
    assert slow.encode_batch(texts) == gpt2.encode_batch(texts)
    assert slow.sha256 == gpt2.sha256  # identity is the files, not the backend


def test_special_token_in_text_becomes_its_id(gpt2, hf_gpt2):
    text = "end<|endoftext|>start"
    assert gpt2.encode_batch([text])[0] == hf_gpt2.encode(text) and 50256 in gpt2.encode_batch([text])[0]


def test_local_folder_tokenizer(tmp_path, hf_gpt2, gpt2):
    folder = tmp_path / "tok"
    hf_gpt2.save_pretrained(str(folder))
    local = load_tokenizer(str(folder))
    assert local.folder == folder
    assert local.encode_batch(["Hello world", " the"]) == [[15496, 995], [262]]
    assert (local.eos_token_id, local.vocab_size, local.max_length) == (50256, 50257, 1024)
    assert local.encode_batch(pydoc_texts()[:20]) == gpt2.encode_batch(pydoc_texts()[:20])
    # Its identity is its content (vocabulary + merges): the vendored GPT-2's, whatever files hold it. The bytes of
    # its files (part of a prepare's fingerprint) are another hash: editing a file changes that one only.
    assert local.sha256 == gpt2.sha256 == load_tokenizer("gpt2", allow_fast_path=False).sha256
    assert local.files_sha256 != gpt2.files_sha256
    (folder / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text() + "\n")
    edited = load_tokenizer(str(folder))
    assert edited.sha256 == local.sha256 and edited.files_sha256 != local.files_sha256


def test_hub_id_offline_is_one_clear_error():
    with pytest.raises(UserError) as exc:
        load_tokenizer("openai-community/gpt2")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("--data.tokenizer=openai-community/gpt2: cannot load it")
    assert "not reachable" in msg and "--data.tokenizer=DIR" in msg


@pytest.mark.parametrize("kind, expected", [
    ("missing", "no such folder"),
    ("empty", "cannot load a tokenizer from this folder"),
    ("broken", "cannot load a tokenizer from this folder"),
])
def test_local_folder_that_cannot_load(tmp_path, kind, expected):
    folder = tmp_path / kind
    if kind != "missing":
        folder.mkdir()
    if kind == "broken":
        (folder / "tokenizer.json").write_text("{")
    with pytest.raises(UserError) as exc:
        load_tokenizer(str(folder))
    assert expected in str(exc.value) and f"--data.tokenizer={folder}" in str(exc.value)


def test_hub_probe_says_unreachable_fast(monkeypatch):
    """The socket probe, not the offline variable: a closed port is 'unreachable' at once."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    hub.hub_reachable.cache_clear()
    try:
        t0 = time.perf_counter()
        assert hub.hub_reachable() is False
        assert time.perf_counter() - t0 < 2.0
        assert hub.ensure_offline_if_unreachable() is False
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    finally:
        hub.hub_reachable.cache_clear()


# ---------------------------------------------------------------------------------------------
# The vendored gpt2 fast path skips transformers; it must stay equal to what transformers gives.


def test_recorded_gpt2_reference_matches_the_hf_tokenizer():
    from distclm.data.tokenize import GPT2_REFERENCE, PROBE_TEXT, load_tokenizer

    hf = load_tokenizer("gpt2", allow_fast_path=False)
    assert hf.backend == "hf"
    assert hf.files_sha256 == GPT2_REFERENCE["sha256"] and hf.sha256 == GPT2_REFERENCE["identity"]
    assert hf.hf(PROBE_TEXT)["input_ids"] == GPT2_REFERENCE["probe_ids"]
    assert (hf.eos_token_id, hf.vocab_size, hf.max_length) == (
        GPT2_REFERENCE["eos_token_id"], GPT2_REFERENCE["vocab_size"], GPT2_REFERENCE["max_length"])


def test_array_encoding_equals_list_encoding_even_with_a_stray_surrogate():
    from distclm.data.tokenize import load_tokenizer

    fast, ref = load_tokenizer("gpt2"), load_tokenizer("gpt2", allow_fast_path=False)
    texts = ["Hello world", " the", "<|endoftext|>", "a\ud800b lone surrogate", "", "naïve café 東京 🎉"]
    arrays = fast.encode_arrays(texts)
    assert [a.tolist() for a in arrays] == ref.encode_batch(texts)


def test_loading_gpt2_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys; from distclm.data.tokenize import load_tokenizer; t = load_tokenizer('gpt2'); "
            "assert t.backend == 'tiktoken'; print('transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
