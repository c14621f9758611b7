"""Issue 28, rule 3 (identity): a prepared folder is known by the content of its input and of its tokenizer.

Changed input bytes (same name, same size) are never reused nor resumed into a mix: one line, exit 2, every file as
it was. A tokenizer folder of the user's own prepares with the ids of the plain tokenizer (the tiktoken fast path
only where it is proven equal). Data of tokenizer A with a model of tokenizer B: train and eval refuse with one
line naming both and the flag; with the flag the run trains and its export carries A.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distclm.data.blocks import SplitWriter
from tests.support.cli import run_cli
from tests.support.data import (
    assert_matches_reference,
    carved_labels,
    encode_all,
    manifest_of,
    output_bytes,
    pydoc_texts,
    read_split,
    reference,
    write_jsonl,
)

TEXT_ARGS = ["--data.shard_blocks=20", "--data.block_size=64", "--data.num_workers=1"]


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under `roots`, by path: what "byte-identical afterwards" compares."""
    return {str(p): p.read_bytes() for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def corpus(path: Path, n: int = 40) -> Path:
    return write_jsonl(path, [{"text": t} for t in pydoc_texts()[:n]])


def edit_same_size(path: Path) -> None:
    """Change bytes in the middle of the file, keeping its size (and name): only its content tells."""
    data = bytearray(path.read_bytes())
    i = data.index(b"the", len(data) // 2)
    data[i:i + 3] = b"THE"
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def own_bpe(folder: Path, full_alphabet: bool) -> Path:
    """A byte-level BPE trained with `tokenizers` on a few KB of pydoc text, saved as a transformers folder.
    Without the full byte alphabet (tokenizers' default BpeTrainer) some bytes have no token: tiktoken panicked on it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_alphabet else []
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(["".join(pydoc_texts())[:6000]], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tokenizer_a(tmp_path_factory) -> Path:
    return own_bpe(tmp_path_factory.mktemp("tok") / "bytes-missing", full_alphabet=False)


@pytest.fixture(scope="module")
def data_a(tmp_path_factory, tokenizer_a) -> Path:
    """pydoc prepared with tokenizer A (a 600-token BPE: smaller than the presets' GPT-2 vocabulary)."""
    from distclm.cli import main

    out = tmp_path_factory.mktemp("data-a") / "prepared"
    assert main(["prepare", "--data.source=pydoc", "--data.max_docs=12", "--data.block_size=32",
                 f"--data.tokenizer={tokenizer_a}", f"--data.dir={out}"]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Input identity


def test_same_size_edit_then_rerun_is_refused_never_stale(cli, tmp_path):
    src, out = corpus(tmp_path / "docs.jsonl"), tmp_path / "out"
    args = ["prepare", f"--data.source={src}", *TEXT_ARGS]
    assert cli(*args, f"--data.dir={out}").code == 0
    assert [f[0] for f in manifest_of(out)["source"]["files"][0]] == ["docs.jsonl"]
    edit_same_size(src)
    before = snapshot(out, src)
    line = cli(*args, f"--data.dir={out}").error_line()
    assert f"--data.dir={out} holds a complete prepare of other settings (input changed since: docs.jsonl)" in line
    assert "--overwrite" in line
    assert snapshot(out, src) == before  # the old output and the edited input, untouched

    # --overwrite rebuilds it: exactly a fresh prepare of the edited input, nothing of the old text left.
    assert cli(*args, f"--data.dir={out}", "--overwrite").code == 0
    assert cli(*args, f"--data.dir={tmp_path / 'fresh'}").code == 0
    assert output_bytes(out) == output_bytes(tmp_path / "fresh")


class Killed(BaseException):
    """Stands for SIGKILL at an exact point: nothing in prepare catches a BaseException."""


def test_kill_mid_prepare_edit_then_resume_never_mixes(cli, tmp_path, monkeypatch):
    src, out = corpus(tmp_path / "docs.jsonl"), tmp_path / "out"
    args = ["prepare", f"--data.source={src}", *TEXT_ARGS, f"--data.dir={out}"]
    real_close, calls = SplitWriter._close_shard, []

    def close_then_die(self):
        real_close(self)
        calls.append(self.split)
        if len(calls) == 3:
            raise Killed

    monkeypatch.setattr("distclm.data.prepare.CHUNK_DOCS", 2)  # a saved state after a few documents
    monkeypatch.setattr(SplitWriter, "_close_shard", close_then_die)
    with pytest.raises(Killed):
        cli(*args)
    monkeypatch.setattr(SplitWriter, "_close_shard", real_close)
    state = json.loads((out / ".prepare-state.json").read_text())
    assert state["next_doc"] > 0 and not (out / "manifest.json").exists()

    edit_same_size(src)
    before = snapshot(out, src)
    line = cli(*args).error_line()
    assert f"--data.dir={out} holds an interrupted prepare of other settings (input changed since: docs.jsonl)" in line
    assert snapshot(out, src) == before  # the partial shards of the old bytes are not resumed, nor removed

    assert cli(*args, "--overwrite").code == 0  # starts over: no block of the old bytes
    assert cli("prepare", f"--data.source={src}", *TEXT_ARGS, f"--data.dir={tmp_path / 'fresh'}").code == 0
    assert output_bytes(out) == output_bytes(tmp_path / "fresh")


def test_input_edited_while_prepare_reads_it_publishes_nothing(cli, tmp_path, monkeypatch):
    from distclm.data import sources

    src, out = corpus(tmp_path / "docs.jsonl"), tmp_path / "out"
    real_documents = sources.documents

    def documents(spec):
        for i, text in enumerate(real_documents(spec)):
            if i == 5:
                edit_same_size(src)  # another process writes the file while prepare is reading it
            yield text

    monkeypatch.setattr(sources, "documents", documents)
    line = cli("prepare", f"--data.source={src}", *TEXT_ARGS, f"--data.dir={out}").error_line()
    assert line.startswith(f"distclm: error: --data.source={src}: the input changed while prepare read it (input changed since: "
                           f"docs.jsonl)")
    assert not (out / "manifest.json").exists()


def test_same_input_bytes_under_any_worker_count_give_one_manifest(cli, tmp_path):
    src = corpus(tmp_path / "docs.jsonl")
    for w in (1, 2):
        assert cli("prepare", f"--data.source={src}", *TEXT_ARGS[:2], f"--data.num_workers={w}",
                   f"--data.dir={tmp_path / str(w)}").code == 0
    assert output_bytes(tmp_path / "1") == output_bytes(tmp_path / "2")
    import hashlib

    assert manifest_of(tmp_path / "1")["source"]["files"] == [
        [["docs.jsonl", src.stat().st_size, hashlib.sha256(src.read_bytes()).hexdigest()]]]


# ---------------------------------------------------------------------------------------------
# The tiktoken fast path: only where it is proven to be the tokenizer it stands in for


@pytest.mark.parametrize("full_alphabet, backend", [(False, "hf"), (True, "tiktoken")])
def test_own_bpe_tokenizer_prepares_with_the_plain_tokenizers_ids(cli, tmp_path, full_alphabet, backend):
    from transformers import PreTrainedTokenizerFast

    from distclm.data.tokenize import load_tokenizer

    folder = own_bpe(tmp_path / "tok", full_alphabet)
    assert load_tokenizer(str(folder)).backend == backend
    out = tmp_path / "out"
    r = cli("prepare", "--data.source=pydoc", "--data.block_size=64", f"--data.tokenizer={folder}",
            f"--data.dir={out}")
    assert r.code == 0, r.err
    plain = PreTrainedTokenizerFast.from_pretrained(str(folder))
    texts = pydoc_texts()
    assert_matches_reference(out, reference(encode_all(plain, texts), carved_labels(len(texts), 0, 0.2),
                                            plain.eos_token_id, 64))
    assert manifest_of(out)["vocab_size"] == len(plain) == 600


def test_a_copy_of_gpt2_keeps_the_fast_path_and_its_identity(tmp_path, hf_gpt2):
    from distclm.data.tokenize import load_tokenizer

    hf_gpt2.save_pretrained(str(tmp_path / "copy"))
    copy, vendored = load_tokenizer(str(tmp_path / "copy")), load_tokenizer("gpt2")
    assert (copy.backend, vendored.backend) == ("tiktoken", "tiktoken")
    assert copy.sha256 == vendored.sha256 and copy.files_sha256 != vendored.files_sha256


# ---------------------------------------------------------------------------------------------
# Tokenizer identity: train and eval compare the data's with the model's


def test_prepared_folder_holds_its_tokenizer(data_a, tokenizer_a):
    from distclm.data.identity import IDENTITY, folder_identity

    t = manifest_of(data_a)["tokenizer"]
    assert (t["name"], t["identity"], t["dir"]) == (str(tokenizer_a), IDENTITY, "tokenizer")
    assert t["sha256"] == folder_identity(data_a / "tokenizer") == folder_identity(tokenizer_a)
    assert max(int(read_split(data_a, "train").max()), 0) < 600


@pytest.mark.parametrize("command", ["train", "eval"])
def test_data_of_tokenizer_a_with_a_model_of_tokenizer_b_is_refused(cli, tmp_path, data_a, tokenizer_a, command):
    from distclm.data.identity import folder_identity

    run = tmp_path / "run"
    before = snapshot(data_a, tokenizer_a)
    line = cli(command, f"--data.dir={data_a}", "--model.name=gpt2-tiny", f"--run.dir={run}").error_line()
    assert line.startswith("distclm: error: --model.name=gpt2-tiny: its tokenizer (gpt2, vendored")
    assert f"{data_a / 'manifest.json'} was tokenized with ({tokenizer_a}; identity " \
           f"{folder_identity(tokenizer_a)[:12]})" in line
    assert "--data.allow_tokenizer_mismatch=true" in line
    assert snapshot(data_a, tokenizer_a) == before and not run.exists()


@pytest.mark.slow  # a training run and an eval, one process each (~30 s): make test, not test-fast
def test_allowed_mismatch_trains_and_the_export_carries_the_datas_tokenizer(tmp_path, data_a, tokenizer_a):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from distclm.data.identity import folder_identity

    run = tmp_path / "run"
    r = run_cli("train", f"--data.dir={data_a}", "--model.name=gpt2-tiny", f"--run.dir={run}",
                "--data.allow_tokenizer_mismatch=true", "--train.max_steps=2", "--train.micro_batch_size=4",
                "--eval.max_blocks=8", "--log.interval_s=0")
    assert r.code == 0, r.err
    exported = AutoTokenizer.from_pretrained(str(run / "export"))
    a = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_a))
    sample = pydoc_texts()[3][:2000] + " naïve café 東京 🎉"
    assert exported(sample)["input_ids"] == a(sample)["input_ids"] and len(exported) == len(a) == 600
    assert folder_identity(run / "export") == folder_identity(tokenizer_a)
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1] / "model"
    assert folder_identity(ckpt) == folder_identity(tokenizer_a)  # checkpoints too

    # The run's export has the data's tokenizer: evaluating it on that data needs no flag.
    r = run_cli("eval", f"--model.name={run}", f"--data.dir={data_a}", "--eval.max_blocks=8")
    assert r.code == 0, r.err
    assert np.isfinite(float(r.out.split("perplexity: ")[1].split()[0]))


def test_folders_without_a_recorded_identity_keep_the_size_check_only(tmp_path, data_a):
    """Folders prepared before the identity was recorded (no manifest tokenizer.identity, no tokenizer/) stay
    readable: their tokenizer sha256 hashed files, so only the vocabulary size is compared, as before."""
    import shutil

    from distclm.data.blocks import BlockReader
    from distclm.errors import UserError
    from distclm.model import carried_tokenizer, check_same_tokenizer

    old = tmp_path / "old"
    shutil.copytree(data_a, old)
    m = manifest_of(old)
    m["tokenizer"] = {"name": m["tokenizer"]["name"], "sha256": "0" * 64}
    (old / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(old / "tokenizer")
    check_same_tokenizer("gpt2-tiny", BlockReader(old), allow=False)
    assert carried_tokenizer("gpt2-tiny", BlockReader(old)) is None
    with pytest.raises(UserError, match="--data.allow_tokenizer_mismatch=true"):
        check_same_tokenizer("gpt2-tiny", BlockReader(data_a), allow=False)
    check_same_tokenizer("gpt2-tiny", BlockReader(data_a), allow=True)
    assert carried_tokenizer("gpt2-tiny", BlockReader(data_a)) == str(data_a / "tokenizer")


def test_a_saved_tokenizer_edited_after_prepare_is_not_carried(cli, tmp_path, data_a):
    import shutil

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data_a, data)
    state = json.loads((data / "tokenizer" / "tokenizer.json").read_text())
    first, second = sorted(state["model"]["vocab"], key=state["model"]["vocab"].get)[1:3]
    vocab = state["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids swapped: other meanings, same size
    (data / "tokenizer" / "tokenizer.json").write_text(json.dumps(state))
    before = snapshot(data)
    line = cli("train", f"--data.dir={data}", "--model.name=gpt2-tiny", f"--run.dir={run}",
               "--data.allow_tokenizer_mismatch=true").error_line()
    assert line.startswith(f"distclm: error: {data / 'tokenizer'}: its tokenizer is not the one ")
    assert line.endswith("it was changed after prepare: re-run prepare with --overwrite")
    assert snapshot(data) == before and not run.exists()


def test_a_model_folder_is_compared_by_content_not_by_its_files(tmp_path, pydoc_prepared, hf_gpt2, tokenizer_a):
    """A model folder whose tokenizer was written by save_pretrained (tokenizer.json, not the vendored vocab.json +
    merges.txt) holds GPT-2's vocabulary: data of the vendored GPT-2 fits it. The same folder with tokenizer A does not."""
    from transformers import PreTrainedTokenizerFast

    from distclm.data.blocks import BlockReader
    from distclm.errors import UserError
    from distclm.model import carried_tokenizer, check_same_tokenizer, model_tokenizer_identity, preset_config

    model = tmp_path / "model"
    preset_config("gpt2-tiny").save_pretrained(str(model))
    hf_gpt2.save_pretrained(str(model))
    assert not (model / "vocab.json").exists() and (model / "tokenizer.json").exists()
    reader = BlockReader(pydoc_prepared)
    check_same_tokenizer(str(model), reader, allow=False)
    assert carried_tokenizer(str(model), reader) is None  # the model's own tokenizer files go into the export

    other = tmp_path / "other"
    preset_config("gpt2-tiny").save_pretrained(str(other))
    PreTrainedTokenizerFast.from_pretrained(str(tokenizer_a)).save_pretrained(str(other))
    model_tokenizer_identity.cache_clear()
    with pytest.raises(UserError, match=f"--model.name={other}: its tokenizer \\({other}; identity "):
        check_same_tokenizer(str(other), reader, allow=False)
