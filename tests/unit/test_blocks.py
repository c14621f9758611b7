"""The block-file format: SplitWriter shards, manifest checks, and BlockReader (read-only, O(1), flat memory)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from distclm.data.blocks import BlockReader, SplitWriter, read_manifest, shard_name
from distclm.errors import UserError
from tests.support.data import manifest_of, read_split


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Writer


def test_split_writer_shards(tmp_path):
    w = SplitWriter(tmp_path, "train", 4, np.dtype(np.uint16), shard_blocks=3)
    blocks = np.arange(8 * 4, dtype=np.uint16).reshape(8, 4)
    assert w.write(blocks[:2]) is False
    assert w.write(blocks[2:7]) is True  # completes shard 0 (3 blocks) and shard 1 (3 blocks)
    assert w.write(blocks[7:]) is False
    w.finish()
    assert [s["file"] for s in w.shards] == ["train-00000.bin", "train-00001.bin", "train-00002.bin"]
    assert [s["n_blocks"] for s in w.shards] == [3, 3, 2] and w.n_blocks == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == [s["file"] for s in w.shards]  # no .partial left
    for s in w.shards:
        assert s["sha256"] == sha256(tmp_path / s["file"])
    got = np.concatenate([np.fromfile(tmp_path / s["file"], dtype="<u2").reshape(-1, 4) for s in w.shards])
    np.testing.assert_array_equal(got, blocks)
    assert shard_name("validation", 12) == "validation-00012.bin"


def test_split_writer_resume_cuts_unsaved_blocks(tmp_path):
    """A killed run may have written blocks past its last saved state: the resumed writer drops them."""
    dtype = np.dtype(np.uint16)
    blocks = np.arange(10 * 2, dtype=np.uint16).reshape(10, 2)
    w = SplitWriter(tmp_path, "train", 2, dtype, shard_blocks=4)
    w.write(blocks[:5])  # shard 0 complete, 1 block in the open shard
    w.sync()
    state = json.loads(json.dumps(w.state()))
    w.write(np.full((2, 2), 999, np.uint16))  # written, then "killed" before any state counted them
    w._fhs[0].flush()  # the token file (the writer keeps one handle per file of the open shard)
    w2 = SplitWriter(tmp_path, "train", 2, dtype, 4, shards=state["shards"], open_blocks=state["open_blocks"])
    w2.write(blocks[5:])
    w2.finish()
    got = np.concatenate([np.fromfile(tmp_path / s["file"], dtype="<u2").reshape(-1, 2) for s in w2.shards])
    np.testing.assert_array_equal(got, blocks)
    assert [s["n_blocks"] for s in w2.shards] == [4, 4, 2]


def test_split_writer_resume_after_rename_before_save(tmp_path):
    """Killed after a shard was renamed into place but before the state counting it was saved."""
    dtype = np.dtype(np.uint16)
    blocks = np.arange(10 * 2, dtype=np.uint16).reshape(10, 2)
    w = SplitWriter(tmp_path, "train", 2, dtype, shard_blocks=4)
    w.write(blocks[:5])
    w.sync()
    state = json.loads(json.dumps(w.state()))  # shard 0 done, 1 block open in shard 1
    w.write(blocks[5:9])  # shard 1 completes and is renamed to train-00001.bin; the state is not saved
    assert (tmp_path / "train-00001.bin").exists() and state["open_blocks"] == 1
    w2 = SplitWriter(tmp_path, "train", 2, dtype, 4, shards=state["shards"], open_blocks=state["open_blocks"])
    w2.write(blocks[5:])
    w2.finish()
    got = np.concatenate([np.fromfile(tmp_path / s["file"], dtype="<u2").reshape(-1, 2) for s in w2.shards])
    np.testing.assert_array_equal(got, blocks)  # not zeros where the saved block was
    # A state that counts blocks nobody has is an error, never silently zero-filled.
    w3 = SplitWriter(tmp_path / "x", "train", 2, dtype, 4, open_blocks=3)
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="train-00000.bin.partial: missing, but the prepare state counts 3 blocks"):
        w3.write(blocks[:1])


# ---------------------------------------------------------------------------------------------
# Manifest checks


@pytest.fixture
def damaged(pydoc_prepared, tmp_path) -> Path:
    """A private copy of the prepared pydoc folder, free to damage."""
    return Path(shutil.copytree(pydoc_prepared, tmp_path / "copy"))


def edit_manifest(folder: Path, **changes) -> None:
    m = manifest_of(folder)
    for key, value in changes.items():
        if value is None:
            m.pop(key)
        else:
            m[key] = value
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("changes, message", [
    ({"version": 3}, "field 'version' is 3, but this distclm reads versions 1 and 2"),
    ({"version": 2}, "data_format missing (must be one of \"chat\", \"prompt_completion\")"),
    ({"format": "something-else"}, "field 'format' is 'something-else', expected 'distclm-blocks'"),
    ({"dtype": "float32"}, "dtype must be one of \"uint16\", \"uint32\", found \"float32\""),
    ({"block_size": None}, "block_size missing (must be an integer >= 2)"),
])
def test_manifest_checks(damaged, changes, message):
    edit_manifest(damaged, **changes)
    with pytest.raises(UserError) as exc:
        BlockReader(damaged)
    assert message in str(exc.value) and str(damaged / "manifest.json") in str(exc.value)


def test_no_manifest_is_never_complete(damaged, tmp_path):
    (damaged / "manifest.json").unlink()
    with pytest.raises(UserError, match="missing, so .* is not a prepared folder"):
        BlockReader(damaged)
    (damaged / "train-00010.bin.partial").write_bytes(b"")
    with pytest.raises(UserError, match="an interrupted prepare"):
        BlockReader(damaged)
    with pytest.raises(UserError, match="no such folder"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# Reader


def test_reader_matches_manifest_and_memmap(pydoc_prepared):
    m = manifest_of(pydoc_prepared)
    reader = BlockReader(pydoc_prepared, verify=True)
    assert (reader.block_size, reader.vocab_size, reader.eos_token_id, reader.dtype) == \
        (128, 50257, 50256, np.dtype(np.uint16))
    for name in ("train", "validation"):
        split = reader.split(name)
        expected = read_split(pydoc_prepared, name)
        assert len(split) == m["splits"][name]["n_blocks"] == len(expected) > 0
        assert len(split.shards) > 1  # several shards, so block -> shard lookup is exercised
        for i in range(len(split)):
            np.testing.assert_array_equal(split[i], expected[i])
        idx = [len(split) - 1, 0, 99, 100, 101]
        np.testing.assert_array_equal(split.batch(idx), expected[idx])
        with pytest.raises(IndexError):
            split[len(split)]
        view = split.memmap(1)
        assert not view.flags.writeable and view.shape == (m["splits"][name]["shards"][1]["n_blocks"], 128)
    with pytest.raises(UserError, match="no split 'test'; splits here: train, validation"):
        reader.split("test")
    reader.close()


def test_reader_block_access_is_one_read(pydoc_prepared, monkeypatch):
    """O(1): block i costs one read of block_size * itemsize bytes, wherever it is."""
    reader = BlockReader(pydoc_prepared)
    split = reader.split("train")
    calls = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: calls.append(n) or real(fd, n, off))
    for i in (0, len(split) - 1, len(split) // 2, 0):
        split[i]
    assert calls == [128 * 2] * 4
    reader.close()


def test_reader_leaves_the_folder_untouched(pydoc_prepared):
    def snapshot():
        return {str(p): (p.stat().st_mtime_ns, sha256(p)) for p in pydoc_prepared.rglob("*") if p.is_file()}

    before = snapshot()
    reader = BlockReader(pydoc_prepared, verify=True)
    for split in reader.splits.values():
        for i in range(len(split)):
            split[i]
    reader.close()
    assert snapshot() == before


def test_verify_finds_a_corrupted_shard(damaged):
    shard = damaged / "train-00003.bin"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    BlockReader(damaged).close()  # same size: only the checksum can tell
    with pytest.raises(UserError) as exc:
        BlockReader(damaged, verify=True)
    assert str(shard) in str(exc.value) and "sha256 does not match" in str(exc.value)


def test_truncated_or_missing_shard_is_refused(damaged):
    shard = damaged / "validation-00001.bin"
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size - 1)
    with pytest.raises(UserError) as exc:
        BlockReader(damaged)
    assert str(shard) in str(exc.value) and "truncated or corrupted" in str(exc.value)
    shard.unlink()
    with pytest.raises(UserError, match="validation-00001.bin: shard listed in the manifest is missing"):
        BlockReader(damaged)


def test_data_must_fit_the_model_said_in_the_models_terms(pydoc_prepared):
    from dataclasses import replace

    from distclm.model import ModelShape, check_data_fits

    reader = BlockReader(pydoc_prepared)
    shape = ModelShape("llama", 64, 2, 4, 16, 1024, 50257)
    check_data_fits(shape, reader, "--model.name=M")
    with pytest.raises(UserError, match=r"--model.name=M: its vocabulary has 1,000 tokens \(vocab_size of its llama "
                                        r"config\) but .*manifest.json was tokenized with gpt2 \(50,257 tokens\)"):
        check_data_fits(replace(shape, vocab_size=1000), reader, "--model.name=M")
    with pytest.raises(UserError, match=r"--model.name=M: it handles at most 64 positions \(max_position_embeddings "
                                        r"of its llama config\) but .* blocks of 128 tokens; .*--data.block_size<=64"):
        check_data_fits(replace(shape, max_positions=64), reader, "--model.name=M")
    check_data_fits(replace(shape, max_positions=None), reader, "--model.name=M")  # no position limit
    reader.close()


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_resident_memory_flat_over_full_passes(big_prepared):
    reader = BlockReader(big_prepared)
    total_bytes = sum((big_prepared / s["file"]).stat().st_size
                      for sp in reader.manifest["splits"].values() for s in sp["shards"])
    assert total_bytes > 5e6
    for split in reader.splits.values():  # warm up: open fds, first allocations
        split[0]
    before = rss_bytes()
    sums = {}
    for _ in range(3):
        for name, split in reader.splits.items():
            acc = 0
            for i in range(len(split)):
                acc += int(split[i].sum())
            sums.setdefault(name, set()).add(acc)
    growth = rss_bytes() - before
    reader.close()
    assert growth < 1.5e6, f"RSS grew by {growth / 1e6:.1f} MB over 3 passes of {total_bytes / 1e6:.1f} MB"
    for name, seen in sums.items():  # every pass read the same, right data
        assert seen == {int(read_split(big_prepared, name).sum(dtype=np.int64))}


def test_the_schema_names_the_field_and_takes_what_prepare_writes(pydoc_prepared, tmp_path):
    from distclm.data.blocks import SCHEMAS
    from distclm.data.schema import Int, Invalid, ListOf, Opt, Record, Str, check

    m = manifest_of(pydoc_prepared)
    check(SCHEMAS[m["version"]], m)  # the writer's output is what the schema describes
    spec = Record({"a": Int(0), "b": ListOf(Record({"c": Opt(Str())}))}, {"d": Int(1, 3)})
    check(spec, {"a": 0, "b": [{"c": None}, {"c": "x"}], "extra": "allowed"})
    cases = [({"a": -1, "b": []}, "a must be an integer >= 0, found -1"),
             ({"b": [{"c": 1}], "a": "x"}, 'a must be an integer >= 0, found "x"'),  # own fields before nested ones
             ({"a": 1, "b": [{"c": "x"}, {"c": 2}]}, "b[1].c must be a string or null, found 2"),
             ({"a": 1, "b": [{}]}, "b[0].c missing (must be a string or null)"),
             ({"a": 1, "b": {}}, "b must be a list, found {}"),
             ({"a": 1, "b": [], "d": 4}, "d must be an integer >= 1 and <= 3, found 4"),
             ({"a": 1.0, "b": []}, "a must be an integer >= 0, found 1.0")]
    for value, message in cases:
        with pytest.raises(Invalid) as exc:
            check(spec, value)
        assert str(exc.value) == message
