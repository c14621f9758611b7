"""Bad input to prepare: one clear line, exit code 2, and nothing in data.dir that looks complete."""

from __future__ import annotations

import pytest

from tests.support.cli import run_cli
from tests.support.data import write_jsonl
from tests.support.env import child_env


def make_inputs(tmp_path):
    write_jsonl(tmp_path / "nofield.jsonl", [{"body": "some text", "title": "t"}] * 3)
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}] * 5)
    write_jsonl(tmp_path / "tiny.jsonl", [{"text": "hi"}])
    (tmp_path / "emptytok").mkdir()
    (tmp_path / "corpus.csv").write_text("text\nhello\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')


CASES = {
    # name: (flags, substrings the one line must contain)
    "missing file": (["--data.source={tmp}/missing.jsonl"], ["--data.source=", "missing.jsonl: no such file or folder"]),
    "unknown hub dataset offline": (["--data.source=nobody/no-such-dataset"],
                                    ["--data.source=nobody/no-such-dataset", "not reachable", "--data.source=DIR"]),
    "eli5 preset offline": (["--preset=eli5-distilgpt2"],
                            ["--data.source=eli5_category", "revision=refs/convert/parquet", "not reachable",
                             "--data.text_field=answers.text"]),
    "missing text field": (["--data.source={tmp}/nofield.jsonl"],
                           ["--data.text_field=text", "document 0", "fields there: body, title"]),
    "empty corpus": (["--data.source={tmp}/empty.jsonl"], ["no training block", "0 non-empty documents"]),
    "only empty documents": (["--data.source={tmp}/blank.jsonl"], ["no training block", "0 non-empty documents"]),
    "too few tokens for a block": (["--data.source={tmp}/tiny.jsonl"], ["no training block", "block_size 128"]),
    "block_size below 2": (["--data.source=pydoc", "--data.block_size=1"], ["--data.block_size=1: must be an integer >= 2"]),
    "block_size above tokenizer max": (["--data.source=pydoc", "--data.block_size=1025"],
                                       ["--data.block_size=1025 exceeds the tokenizer's maximum length 1024"]),
    "tokenizer folder not loadable": (["--data.source=pydoc", "--data.tokenizer={tmp}/emptytok"],
                                      ["--data.tokenizer=", "cannot load a tokenizer from this folder"]),
    "tokenizer hub id offline": (["--data.source=pydoc", "--data.tokenizer=nobody/no-such-tokenizer"],
                                 ["--data.tokenizer=nobody/no-such-tokenizer", "not reachable", "--data.tokenizer=DIR"]),
    "no source": ([], ["--data.source is required"]),
    "unsupported file type": (["--data.source={tmp}/corpus.csv"], ["corpus.csv: unsupported file type"]),
    "invalid json line": (["--data.source={tmp}/broken.jsonl"], ["broken.jsonl:2: not valid JSON"]),
    "val_docs leaves no train": (["--data.source=pydoc", "--data.val_docs=79"], ["--data.val_docs=79 leaves no training"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_complete(cli, tmp_path, name):
    make_inputs(tmp_path)
    flags, expected = CASES[name]
    out = tmp_path / "out"
    r = cli("prepare", *(f.format(tmp=tmp_path) for f in flags), f"--data.dir={out}")
    line = r.error_line()
    for text in expected:
        assert text in line, (text, line)
    assert not (out / "manifest.json").exists()
    assert not out.exists() or not list(out.glob("*.bin"))


def test_no_data_dir(cli):
    assert "--data.dir is required" in cli("prepare", "--data.source=pydoc").error_line()


def test_hub_dataset_through_the_real_probe(tmp_path):
    """No offline variable: the socket probe finds the hub unreachable and the error says so, fast."""
    env = child_env(HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    r = run_cli("prepare", "--data.source=nobody/no-such-dataset", f"--data.dir={tmp_path / 'out'}", env=env,
                timeout=60)
    line = r.error_line()
    assert "not reachable" in line and "--data.source=DIR" in line
    assert not (tmp_path / "out" / "manifest.json").exists()
