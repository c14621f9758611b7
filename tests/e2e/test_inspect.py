"""`distclm inspect DIR [--verify]`: the summary numbers, the decoded first block, and damaged folders."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.support.data import manifest_of, read_split


def test_inspect_prints_the_summary_and_first_block(cli, pydoc_prepared, hf_gpt2):
    r = cli("inspect", pydoc_prepared)
    assert r.code == 0, r.err
    m = manifest_of(pydoc_prepared)
    assert "format     distclm-blocks v1" in r.out
    assert re.search(r"^source\s+pydoc split=train field=text max_docs=None", r.out, re.M)
    assert re.search(rf"^tokenizer\s+gpt2 sha256 {m['tokenizer']['sha256'][:16]}\s+vocab 50257\s+eos 50256", r.out, re.M)
    assert re.search(r"^blocks\s+128 tokens, uint16", r.out, re.M)
    for name, s in m["splits"].items():
        row = re.search(rf"^{name}\s+([\d,]+) docs\s+([\d,]+) tokens\s+([\d,]+) blocks\s+(\d+) shard\(s\)\s+"
                        rf"dropped tail (\d+) tokens", r.out, re.M)
        assert row, name
        numbers = [int(g.replace(",", "")) for g in row.groups()]
        assert numbers == [s["n_docs"], s["n_tokens"], s["n_blocks"], len(s["shards"]), s["dropped_tokens"]]
    first = read_split(pydoc_prepared, "train")[0].tolist()
    head, _, body = r.out.partition("first train block:\n")
    assert body == hf_gpt2.decode(first) + "\n"  # the last thing printed
    assert body.startswith("The \"assert\" statement")  # the first pydoc topic, in plain text
    assert "checksums" not in r.out


def test_inspect_verify_ok_and_data_dir_flag(cli, pydoc_prepared):
    r = cli("inspect", f"--data.dir={pydoc_prepared}", "--verify")
    assert r.code == 0, r.err
    assert "checksums  ok" in r.out


@pytest.fixture
def copy(pydoc_prepared, tmp_path):
    return shutil.copytree(pydoc_prepared, tmp_path / "copy")


def test_inspect_verify_catches_corruption(cli, copy):
    shard = copy / "validation-00000.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli("inspect", copy).code == 0  # sizes still match: only the checksum tells
    line = cli("inspect", copy, "--verify").error_line()
    assert str(shard) in line and "sha256 does not match the manifest" in line


def test_inspect_refuses_truncated_shard(cli, copy):
    shard = copy / "train-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    line = cli("inspect", copy).error_line()
    assert str(shard) in line and "truncated or corrupted" in line


def test_inspect_refuses_unknown_version(cli, copy):
    m = manifest_of(copy)
    m["version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    line = cli("inspect", copy).error_line()
    assert "field 'version' is 99, but this distclm reads versions 1 and 2" in line


def test_inspect_errors(cli, tmp_path):
    assert "no such folder" in cli("inspect", tmp_path / "nowhere").error_line()
    assert "not a prepared folder" in cli("inspect", tmp_path).error_line()
    assert "inspect needs a folder" in cli("inspect").error_line()
