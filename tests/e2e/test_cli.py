"""The command line: --help, --print-config, prepare.yaml, flag errors, and no torch in prepare."""

from __future__ import annotations

import subprocess
import sys

import yaml

from distclm import config
from tests.support.data import PYDOC_ARGS
from tests.support.env import child_env


def test_prepare_help_lists_every_field_with_doc_and_default(cli):
    r = cli("prepare", "--help")
    assert r.code == 0
    lines = r.out.splitlines()
    for flag, doc in config.help_lines():
        row = [ln for ln in lines if ln.split() and ln.split()[0] == flag]
        assert len(row) == 1, flag
        assert row[0].rstrip().endswith(doc), flag
    for extra in ("--preset", "--config", "--print-config", "--overwrite", "--verify"):
        assert any(ln.split() and ln.split()[0].startswith(extra) for ln in lines), extra
    assert "--data.block_size" in r.out and "Tokens per training block. (default: 128)" in r.out


def test_main_help_and_version(cli):
    r = cli("--help")
    assert r.code == 0 and "prepare" in r.out and "inspect" in r.out
    r = cli("--version")
    assert r.code == 0 and r.out.startswith("distclm ")


def test_print_config_shows_resolved_precedence(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo preset's data.dir is relative: data/pydoc
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  val_fraction: 0.3\n  block_size: 64\n")
    r = cli("prepare", "--preset=demo", "--config", path, "--data.block_size", "32", "--print-config")
    assert r.code == 0
    tree = yaml.safe_load(r.out)
    assert tree["data"]["source"] == "pydoc"           # preset
    assert tree["data"]["val_fraction"] == 0.3         # file over preset's 0.1
    assert tree["data"]["block_size"] == 32            # flag over file
    assert tree["train"]["lr"] == 1e-3                 # preset over the default 2e-5
    assert tree["train"]["weight_decay"] == 0.01       # default (the preset does not set it)
    assert set(tree) == set(config.SECTIONS)
    assert tree["data"]["dir"] == "data/pydoc"
    assert not (tmp_path / "data").exists()            # --print-config prepares nothing


def test_prepare_writes_resolved_config_next_to_output(cli, tmp_path):
    args = ["prepare", *PYDOC_ARGS, "--data.max_docs=5", "--data.seed", "7", f"--data.dir={tmp_path / 'out'}"]
    printed = cli(*args, "--print-config").out
    r = cli(*args)
    assert r.code == 0, r.err
    saved = (tmp_path / "out" / "prepare.yaml").read_text()
    assert saved == printed
    tree = yaml.safe_load(saved)
    assert (tree["data"]["max_docs"], tree["data"]["seed"], tree["data"]["shard_blocks"]) == (5, 7, 100)


def test_unknown_flag_is_one_line_with_closest_key(cli):
    r = cli("prepare", "--data.source=pydoc", "--data.blok_size=64")
    assert r.error_line() == "distclm: error: unknown flag --data.blok_size (did you mean --data.block_size?)"
    r = cli("prepare", "--data.source=pydoc", "--overwrit")
    assert "did you mean --overwrite?" in r.error_line()
    r = cli("prepar")
    assert "did you mean 'prepare'?" in r.error_line()


def test_bad_value_names_flag_and_expected_type(cli):
    r = cli("prepare", "--data.block_size=big")
    assert r.error_line() == "distclm: error: --data.block_size: expected an integer, got 'big'"
    r = cli("prepare", "--data.val_fraction", "lots")
    assert r.error_line() == "distclm: error: --data.val_fraction: expected a number, got 'lots'"
    r = cli("prepare", "--data.block_size")
    assert "--data.block_size expects a value" in r.error_line()


def test_user_error_in_a_real_process_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distclm.cli", "prepare", "--data.blok_size=3"],
                          env=child_env(), capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "distclm: error: unknown flag --data.blok_size (did you mean --data.block_size?)"]


def test_prepare_and_inspect_do_not_import_torch(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from distclm.cli import main\n"
        f"assert main(['prepare', '--data.source=pydoc', '--data.max_docs=10', '--data.dir={out}']) == 0\n"
        f"assert main(['inspect', '{out}']) == 0\n"
        "assert 'torch' not in sys.modules, 'prepare/inspect imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
