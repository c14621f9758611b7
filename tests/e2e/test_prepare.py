"""`distclm prepare` end to end: exact blocks against a reference, the manifest contract, the split,
local formats, the ELI5 preset's code path, and byte-identical output for any worker count or chunking."""

from __future__ import annotations

import hashlib
import json
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distclm.data import prepare as prepare_mod
from distclm.ownership import MARKER
from tests.support.data import (
    PYDOC_ARGS,
    assert_matches_reference,
    carved_labels,
    encode_all,
    manifest_of,
    output_bytes,
    pydoc_texts,
    read_split,
    reference,
    reference_split,
    write_jsonl,
)

EOS = 50256


def test_pydoc_blocks_equal_the_reference(pydoc_prepared, hf_gpt2):
    texts = pydoc_texts()
    ref = reference(encode_all(hf_gpt2, texts), carved_labels(len(texts), 0, 0.2), EOS, 128)
    assert_matches_reference(pydoc_prepared, ref)
    m = manifest_of(pydoc_prepared)
    assert m["splits"]["train"]["n_docs"] + m["splits"]["validation"]["n_docs"] == len(texts)
    # ~20% of the documents carved off for validation, per document.
    assert 0.1 < m["splits"]["validation"]["n_docs"] / len(texts) < 0.3


def test_manifest_follows_the_contract(pydoc_prepared, tmp_path_factory):
    m = manifest_of(pydoc_prepared)
    assert m["format"] == "distclm-blocks" and m["version"] == 1
    assert (m["dtype"], m["block_size"], m["vocab_size"], m["eos_token_id"]) == ("uint16", 128, 50257, EOS)
    assert m["tokenizer"]["name"] == "gpt2" and re.fullmatch(r"[0-9a-f]{64}", m["tokenizer"]["sha256"])
    src = m["source"]
    for key in ("source", "config", "split", "revision", "text_field", "join_with", "max_docs"):
        assert key in src, key
    assert (src["source"], src["split"], src["text_field"], src["join_with"], src["max_docs"]) == \
        ("pydoc", "train", "text", " ", None)
    assert set(m["splits"]) == {"train", "validation"}
    for name, s in m["splits"].items():
        assert set(s) == {"shards", "n_blocks", "n_tokens", "n_docs", "dropped_tokens"}
        assert [sh["file"] for sh in s["shards"]] == [f"{name}-{i:05d}.bin" for i in range(len(s["shards"]))]
        assert all(sh["n_blocks"] == 100 for sh in s["shards"][:-1]) and 0 < s["shards"][-1]["n_blocks"] <= 100
        assert sum(sh["n_blocks"] for sh in s["shards"]) == s["n_blocks"]
        for sh in s["shards"]:
            path = pydoc_prepared / sh["file"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sh["sha256"]
            assert path.stat().st_size == sh["n_blocks"] * 128 * 2  # raw uint16, no header
        assert s["n_tokens"] == s["n_blocks"] * 128 + s["dropped_tokens"]
    assert len(m["splits"]["train"]["shards"]) >= 5
    # Nothing but the output: no state, no partial shards; no paths or timestamps in the manifest.
    names = {p.name for p in pydoc_prepared.iterdir()}
    shards = {sh["file"] for s in m["splits"].values() for sh in s["shards"]}
    assert names == {"manifest.json", "prepare.yaml", "tokenizer", MARKER} | shards  # MARKER: the folder is distclm's data
    text = (pydoc_prepared / "manifest.json").read_text()
    assert str(tmp_path_factory.getbasetemp()) not in text and "num_workers" not in text


def test_memmap_reads_shards_as_the_design_says(pydoc_prepared):
    m = manifest_of(pydoc_prepared)
    first = m["splits"]["train"]["shards"][0]
    view = np.memmap(pydoc_prepared / first["file"], dtype=m["dtype"], mode="r").reshape(-1, m["block_size"])
    assert view.shape == (first["n_blocks"], 128) and int(view.max()) < m["vocab_size"]


def test_eos_between_docs_false_is_the_plain_join(cli, tmp_path, hf_gpt2):
    texts = pydoc_texts()[:30]
    ids = encode_all(hf_gpt2, texts)
    labels = carved_labels(len(texts), 0, 0.2)
    plain, with_eos = tmp_path / "plain", tmp_path / "eos"
    assert cli("prepare", *PYDOC_ARGS, "--data.max_docs=30", "--data.eos_between_docs", "false",
               f"--data.dir={plain}").code == 0
    assert cli("prepare", *PYDOC_ARGS, "--data.max_docs=30", f"--data.dir={with_eos}").code == 0
    assert_matches_reference(plain, reference(ids, labels, None, 128))
    assert_matches_reference(with_eos, reference(ids, labels, EOS, 128))
    for split in ("train", "validation"):
        n = [len(d) for d, lab in zip(ids, labels) if lab == split]
        assert manifest_of(plain)["splits"][split]["n_tokens"] == sum(n)
        assert manifest_of(with_eos)["splits"][split]["n_tokens"] == sum(n) + len(n)
    assert int((read_split(plain, "train") == EOS).sum()) == 0
    assert int((read_split(with_eos, "train") == EOS).sum()) > 0
    assert manifest_of(plain)["source"]["eos_between_docs"] is False


def test_byte_identical_for_any_workers_and_chunking(cli, tmp_path, monkeypatch, hf_gpt2):
    """Shards AND manifest are the same bytes for 1, 2, 3 workers and for tiny or huge chunks."""
    args = ["prepare", "--data.source=pydoc", "--data.block_size=64", "--data.shard_blocks=37"]
    outputs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        assert cli(*args, f"--data.num_workers={workers}", f"--data.dir={out}").code == 0
        outputs[f"workers={workers}"] = output_bytes(out)
    for chunk_docs, chunk_chars in ((1, 1 << 30), (3, 5000), (1 << 20, 1 << 30)):
        monkeypatch.setattr(prepare_mod, "CHUNK_DOCS", chunk_docs)
        monkeypatch.setattr(prepare_mod, "CHUNK_CHARS", chunk_chars)
        out = tmp_path / f"c{chunk_docs}-{chunk_chars}"
        assert cli(*args, "--data.num_workers=2", f"--data.dir={out}").code == 0
        outputs[f"chunks={chunk_docs},{chunk_chars}"] = output_bytes(out)
    first = outputs["workers=1"]
    assert len([n for n in first if n.endswith(".bin")]) > 10
    for name, files in outputs.items():
        assert files.keys() == first.keys(), name
        for file in files:
            assert files[file] == first[file], f"{name}: {file} differs"
    texts = pydoc_texts()
    assert_matches_reference(tmp_path / "w3", reference(encode_all(hf_gpt2, texts),
                                                        carved_labels(len(texts), 0, 0.2), EOS, 64))


def test_seed_and_fraction_decide_the_split(cli, tmp_path, hf_gpt2):
    texts = pydoc_texts()
    out = tmp_path / "out"
    assert cli("prepare", *PYDOC_ARGS, "--data.seed=5", "--data.val_fraction=0.5", f"--data.dir={out}").code == 0
    labels = carved_labels(len(texts), 5, 0.5)
    assert labels != carved_labels(len(texts), 0, 0.5)
    assert_matches_reference(out, reference(encode_all(hf_gpt2, texts), labels, EOS, 128))
    assert 0.3 < manifest_of(out)["splits"]["validation"]["n_docs"] / len(texts) < 0.7


def test_val_docs_is_an_exact_count(cli, tmp_path, hf_gpt2):
    texts = pydoc_texts()
    ids = encode_all(hf_gpt2, texts)
    sets = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        assert cli("prepare", *PYDOC_ARGS, "--data.val_docs=7", f"--data.seed={seed}", f"--data.dir={out}").code == 0
        m = manifest_of(out)
        assert m["splits"]["validation"]["n_docs"] == 7
        assert m["splits"]["train"]["n_docs"] == len(texts) - 7
        total = sum(s["n_tokens"] for s in m["splits"].values())
        assert total == sum(map(len, ids)) + len(ids)
        sets.append(read_split(out, "validation").tobytes())
    assert sets[0] != sets[1]  # the seed picks which 7


def test_val_split_from_another_local_file(cli, tmp_path, hf_gpt2):
    texts = pydoc_texts()
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in texts[:50]])
    val_file = write_jsonl(tmp_path / "val.jsonl.gz", [{"text": t} for t in texts[50:]])
    out = tmp_path / "out"
    assert cli("prepare", f"--data.source={train_file}", f"--data.val_split={val_file}", "--data.shard_blocks=100",
               f"--data.dir={out}").code == 0
    ref = {"train": reference_split(encode_all(hf_gpt2, texts[:50]), EOS, 128),
           "validation": reference_split(encode_all(hf_gpt2, texts[50:]), EOS, 128)}
    assert_matches_reference(out, ref)
    assert manifest_of(out)["source"]["val_split"] == str(val_file)


def test_local_formats_folder_and_glob(cli, tmp_path, hf_gpt2):
    texts = pydoc_texts()
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_jsonl(corpus / "a.jsonl.gz", [{"text": t} for t in texts[:10]] + [{"text": ""}])  # empty doc: skipped
    pq.write_table(pa.Table.from_pylist([{"text": t, "n": i} for i, t in enumerate(texts[10:20])]),
                   corpus / "b.parquet")
    (corpus / "c.json").write_text(json.dumps({"data": [{"text": t} for t in texts[20:25]]}))
    (corpus / "sub" / "d.txt").write_text("\n\n".join(["para one\nstill one", "para two", "para three"]))
    (corpus / "README.md").write_text("not a source file")
    expected = texts[:10] + [""] + texts[10:25] + ["para one\nstill one", "para two", "para three"]
    out = tmp_path / "out"
    r = cli("prepare", f"--data.source={corpus}", "--data.txt_mode=paragraph",
            "--data.val_fraction=0", "--data.block_size=32", f"--data.dir={out}")
    assert r.code == 0, r.err
    assert_matches_reference(out, {"train": reference_split(encode_all(hf_gpt2, expected), EOS, 32),
                                   "validation": reference_split([], EOS, 32)})
    assert manifest_of(out)["splits"]["train"]["n_docs"] == len(expected) - 1
    assert manifest_of(out)["splits"]["validation"]["shards"] == []
    out2 = tmp_path / "out2"
    r = cli("prepare", f"--data.source={corpus}/*.parquet", "--data.val_fraction=0",
            "--data.block_size=32", "--data.max_docs=4", f"--data.dir={out2}")
    assert r.code == 0, r.err
    assert_matches_reference(out2, {"train": reference_split(encode_all(hf_gpt2, texts[10:14]), EOS, 32),
                                    "validation": reference_split([], EOS, 32)})


def test_txt_line_mode(cli, tmp_path, hf_gpt2):
    lines = [ln for ln in pydoc_texts()[0].splitlines() if ln.strip()]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert cli("prepare", f"--data.source={tmp_path / 'a.txt'}", "--data.txt_mode=line", "--data.block_size=16",
               f"--data.dir={out}").code == 0
    ref = reference(encode_all(hf_gpt2, lines), carved_labels(len(lines), 0, 0.2), EOS, 16)
    assert_matches_reference(out, ref)
    assert sum(s["n_docs"] for s in manifest_of(out)["splits"].values()) == len(lines)


def eli5_like_records(n: int) -> list[dict]:
    """Records shaped like eli5_category: answers is a struct of parallel lists."""
    rng = random.Random(0)
    sentences = [ln.strip() for t in pydoc_texts() for ln in t.splitlines() if len(ln.strip()) > 20]
    records = []
    for i in range(n):
        k = rng.randint(1, 3)
        records.append({"q_id": f"q{i}", "title": f"Why {i}?", "selftext": "",
                        "answers": {"a_id": [f"a{i}_{j}" for j in range(k)],
                                    "text": [rng.choice(sentences) for _ in range(k)],
                                    "score": [rng.randint(0, 9) for _ in range(k)]}})
    return records


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_eli5_preset_code_path_on_a_local_file(cli, tmp_path, hf_gpt2, fmt):
    """The tutorial's selection: the first 5000 documents, answers.text joined with " ", ~20% validation."""
    records = eli5_like_records(5200)
    path = tmp_path / f"eli5.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        write_jsonl(path, records)
    out = tmp_path / "out"
    r = cli("prepare", "--preset=eli5-distilgpt2", f"--data.source={path}", f"--data.dir={out}")
    assert r.code == 0, r.err
    m = manifest_of(out)
    assert (m["source"]["text_field"], m["source"]["join_with"], m["source"]["max_docs"]) == ("answers.text", " ", 5000)
    assert m["block_size"] == 128
    texts = [" ".join(rec["answers"]["text"]) for rec in records[:5000]]
    ref = reference(encode_all(hf_gpt2, texts), carved_labels(5000, 0, 0.2), EOS, 128)
    assert_matches_reference(out, ref)
    n_val = m["splits"]["validation"]["n_docs"]
    assert m["splits"]["train"]["n_docs"] + n_val == 5000
    assert 0.18 < n_val / 5000 < 0.22


def test_local_folder_tokenizer_gives_the_same_ids(cli, tmp_path, hf_gpt2, pydoc_prepared):
    folder = tmp_path / "tok"
    hf_gpt2.save_pretrained(str(folder))
    out = tmp_path / "out"
    assert cli("prepare", *PYDOC_ARGS, f"--data.tokenizer={folder}", f"--data.dir={out}").code == 0
    a, b = output_bytes(out), output_bytes(pydoc_prepared)
    assert {k: v for k, v in a.items() if k.endswith(".bin")} == {k: v for k, v in b.items() if k.endswith(".bin")}
    m = manifest_of(out)
    assert m["tokenizer"]["name"] == str(folder)
    # Identity by content: the vendored vocab.json + merges.txt and this save_pretrained folder hold one vocabulary.
    assert m["tokenizer"]["sha256"] == manifest_of(pydoc_prepared)["tokenizer"]["sha256"]
    assert m["source"]["fingerprint"] != manifest_of(pydoc_prepared)["source"]["fingerprint"]  # other files
    assert (m["vocab_size"], m["eos_token_id"]) == (50257, EOS)
