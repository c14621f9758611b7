"""Crash safety: SIGKILL mid-prepare then resume to the same bytes; reruns that do nothing; other settings refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from distclm.data.blocks import BlockReader
from distclm.errors import UserError
from distclm.ownership import MARKER
from tests.support.cli import run_cli
from tests.support.data import BIG_ARGS, PYDOC_ARGS, manifest_of, output_bytes
from tests.support.env import child_env

# The real CLI, with document reading slowed down (2 ms per document, ~3 s for the big corpus), so
# that the kill lands mid-run however fast tokenizing gets. Only the pace differs: same argv, same output.
THROTTLED = """
import sys, time
from distclm.data import sources
_documents = sources.documents
def documents(spec):
    for text in _documents(spec):
        time.sleep(0.002)
        yield text
sources.documents = documents
from distclm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_rerun_resumes_to_identical_bytes(big_corpus, big_prepared, tmp_path):
    out = tmp_path / "out"
    # One worker here, two in the uninterrupted reference: resume must not depend on that either.
    args = ["prepare", f"--data.source={big_corpus}", *BIG_ARGS, "--data.num_workers=1", f"--data.dir={out}"]
    proc = subprocess.Popen([sys.executable, "-c", THROTTLED, *args], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ((out / "train-00001.bin").exists() and (out / ".prepare-state.json").exists()):
            assert proc.poll() is None, f"prepare ended before the kill: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no shard completed within 60 s"
            time.sleep(0.005)
        assert proc.poll() is None, "prepare finished before it could be killed; slow it down more"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    # Killed: shards on disk, but no manifest, so nothing reads the folder as complete.
    assert not (out / "manifest.json").exists()
    assert (out / "train-00000.bin").exists()
    with pytest.raises(UserError, match="an interrupted prepare"):
        BlockReader(out)
    assert run_cli("inspect", out).error_line().endswith(f"run `distclm prepare --data.dir={out}`")

    r = run_cli(*args)
    assert r.code == 0, r.err
    assert "resuming an interrupted prepare from document" in r.out
    start = int(r.out.split("from document ")[1].split()[0])
    assert 0 < start < 1580  # it skipped what was done, and did not start over
    assert output_bytes(out) == output_bytes(big_prepared)
    assert sorted(p.name for p in out.iterdir()) == sorted(["prepare.yaml", "tokenizer", MARKER, *(
        k for k in output_bytes(big_prepared) if not k.startswith("tokenizer/"))])


def test_rerun_on_complete_output_does_nothing(cli, pydoc_prepared):
    files = sorted(pydoc_prepared.iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in files}
    content = output_bytes(pydoc_prepared)
    t0 = time.perf_counter()
    r = cli("prepare", *PYDOC_ARGS, f"--data.dir={pydoc_prepared}")
    assert r.code == 0
    assert "nothing to do" in r.out
    assert time.perf_counter() - t0 < 5
    assert {p.name: p.stat().st_mtime_ns for p in sorted(pydoc_prepared.iterdir())} == before
    assert output_bytes(pydoc_prepared) == content


def test_other_settings_refused_unless_overwrite(cli, pydoc_prepared, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(pydoc_prepared, out)
    before = output_bytes(out)
    r = cli("prepare", "--data.source=pydoc", "--data.shard_blocks=300", f"--data.dir={out}")
    line = r.error_line()
    assert f"--data.dir={out} holds a complete prepare of other settings" in line and "--overwrite" in line
    assert output_bytes(out) == before

    r = cli("prepare", "--data.source=pydoc", "--data.shard_blocks=300", f"--data.dir={out}", "--overwrite")
    assert r.code == 0, r.err
    m = manifest_of(out)
    assert m["shard_blocks"] == 300
    # The old shards are gone: only the new manifest's files remain.
    shards = {sh["file"] for s in m["splits"].values() for sh in s["shards"]}
    assert {p.name for p in out.iterdir()} == {"manifest.json", "prepare.yaml", "tokenizer", MARKER} | shards
    assert m["splits"]["train"]["n_blocks"] == manifest_of(pydoc_prepared)["splits"]["train"]["n_blocks"]


def test_interrupted_prepare_of_other_settings_is_refused(cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".prepare-state.json").write_text('{"fingerprint": "someone-else", "next_doc": 3, "splits": {}}')
    (out / "train-00000.bin.partial").write_bytes(b"\0" * 256)
    line = cli("prepare", *PYDOC_ARGS, "--data.max_docs=5", f"--data.dir={out}").error_line()
    assert "holds an interrupted prepare of other settings" in line
    assert cli("prepare", *PYDOC_ARGS, "--data.max_docs=5", f"--data.dir={out}", "--overwrite").code == 0
    assert not (out / "train-00000.bin.partial").exists() and (out / "manifest.json").exists()


class Killed(BaseException):
    """Stands for SIGKILL at an exact point: nothing in prepare catches a BaseException."""


@pytest.mark.parametrize("kill_at", [1, 3, 7])
def test_kill_right_after_a_shard_is_renamed(cli, pydoc_prepared, tmp_path, monkeypatch, kill_at):
    """The narrowest window: a shard was renamed into place but the state that counts it was not saved."""
    from distclm.data.blocks import SplitWriter

    real_close = SplitWriter._close_shard
    calls = []

    def close_then_die(self):
        real_close(self)
        calls.append(self.split)
        if len(calls) == kill_at:
            raise Killed

    out = tmp_path / "out"
    args = ["prepare", *PYDOC_ARGS, "--data.num_workers=1", f"--data.dir={out}"]
    monkeypatch.setattr("distclm.data.prepare.CHUNK_DOCS", 2)  # several saves, several shards per save
    monkeypatch.setattr(SplitWriter, "_close_shard", close_then_die)
    with pytest.raises(Killed):
        cli(*args)
    monkeypatch.setattr(SplitWriter, "_close_shard", real_close)
    assert not (out / "manifest.json").exists()
    r = cli(*args)
    assert r.code == 0, r.err
    assert output_bytes(out) == output_bytes(pydoc_prepared)
    BlockReader(out, verify=True).close()
