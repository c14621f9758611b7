"""Ownership and one writer (issue 28, rules 1 and 4): distclm deletes or replaces only what it can prove it wrote,
and a run dir has one training job at a time.

Every refusal is checked three ways: exit 2, one line (Result.error_line()), and every file under the test's folder
byte-identical afterwards (tree(): a hash of every file and the list of every folder, before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distclm.ownership import MARKER, kind_of
from distclm.runlock import LOCK, REFRESH_S, Holder, RunLock
from tests.support.cli import run_cli, start_cli
from tests.support.env import child_env

DATA_ARGS = ["--data.source=pydoc", "--data.max_docs=40", "--data.block_size=32", "--data.shard_blocks=200"]
TRAIN_ARGS = ["--model.name=gpt2-tiny", "--train.micro_batch_size=4", "--eval.max_blocks=8", "--log.every_steps=1"]


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` by its sha256 (a symlink by its target), every folder as "dir"."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def make(root: Path, files: dict[str, str]) -> Path:
    """Files of the user's own (name -> text; a name ending in / is an empty folder) under `root`."""
    for name, text in files.items():
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


FOREIGN = {
    "the issue's reproduction": {"weights.bin": "precious\n", "important.bin/x": "keep\n"},
    "a model folder": {"config.json": '{"model_type": "gpt2"}\n', "pytorch_model.bin": "weights\n"},
    "files of other names": {"notes.txt": "mine\n", "data.csv": "a,b\n"},
    "nested folders": {"a/b/c/deep.bin": "deep\n", "a/b/train-00000.bin": "not a shard of distclm's\n"},
    "distclm's own names, unmarked": {"train-00000.bin": "x" * 64, "prepare.yaml": "mine: true\n"},
    "an empty folder inside": {"empty/": ""},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from distclm.cli import main

    out = tmp_path_factory.mktemp("own-data") / "data"
    assert main(["prepare", *DATA_ARGS, f"--data.dir={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    """A run of 2 steps (its own export/ included). Copy it before a test that may change it."""
    run = tmp_path_factory.mktemp("own-run") / "run"
    run_cli("train", f"--data.dir={prepared}", *TRAIN_ARGS, "--train.max_steps=2", f"--run.dir={run}", check=True)
    return run


def copy_run(trained: Path, root: Path) -> Path:
    return Path(shutil.copytree(trained, root / "run", symlinks=True))


# ---------------------------------------------------------------------------------------------
# prepare


@pytest.mark.parametrize("files", FOREIGN.values(), ids=FOREIGN.keys())
@pytest.mark.parametrize("overwrite", [False, True], ids=["", "overwrite"])
def test_prepare_refuses_a_folder_it_did_not_write(cli, tmp_path, files, overwrite):
    folder = make(tmp_path / "mine", files)
    before = tree(tmp_path)
    line = cli("prepare", *DATA_ARGS, f"--data.dir={folder}", *(["--overwrite"] if overwrite else [])).error_line()
    n = len(os.listdir(folder))
    assert f"--data.dir={folder} holds {n} entr{'y' if n == 1 else 'ies'} distclm did not write" in line
    assert "choose another --data.dir" in line
    assert tree(tmp_path) == before


@pytest.mark.parametrize("what", ["run", "export"])
def test_prepare_refuses_a_run_dir_or_an_export(cli, tmp_path, trained, what):
    run = copy_run(trained, tmp_path)
    folder = run if what == "run" else run / "export"
    before = tree(tmp_path)
    line = cli("prepare", *DATA_ARGS, f"--data.dir={folder}", "--overwrite").error_line()
    kind = "a run dir (distclm train)" if what == "run" else "an export (distclm export)"
    assert line.endswith(f"--data.dir={folder} is {kind}, not a prepared dataset (distclm prepare); "
                         f"choose another --data.dir")
    assert tree(tmp_path) == before


def test_prepare_into_the_current_folder_of_the_users_files_is_refused(cli, tmp_path, monkeypatch):
    make(tmp_path, FOREIGN["a model folder"])
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    assert "--data.dir=. holds 2 entries" in cli("prepare", *DATA_ARGS, "--data.dir=.").error_line()
    assert tree(tmp_path) == before


def test_prepare_into_a_new_or_empty_folder_marks_it_as_data(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        assert cli("prepare", *DATA_ARGS, f"--data.dir={folder}").code == 0
        assert json.loads((folder / MARKER).read_text())["kind"] == "data"
        assert kind_of(folder) == "data"


def test_overwrite_of_its_own_data_removes_only_its_own_files(cli, tmp_path, prepared):
    """A user's file put into a distclm data folder, even one named like a shard, is not prepare's to remove."""
    out = Path(shutil.copytree(prepared, tmp_path / "data"))
    mine = {"notes.txt": "mine\n", "extra.bin": "mine\n", "sub.bin/x": "mine\n", "train-1.bin": "mine\n"}
    make(out, mine)
    before = {k: v for k, v in tree(out).items() if k.split("/")[0] in {n.split("/")[0] for n in mine}}
    r = cli("prepare", *DATA_ARGS[:-1], "--data.shard_blocks=50", f"--data.dir={out}", "--overwrite")
    assert r.code == 0, r.err
    after = tree(out)
    assert {k: after[k] for k in before} == before
    shards = {s["file"] for sp in json.loads((out / "manifest.json").read_text())["splits"].values()
              for s in sp["shards"]}
    assert len(shards) > 2
    assert {p.name for p in out.iterdir()} == {"manifest.json", "prepare.yaml", "tokenizer", MARKER, "notes.txt", "extra.bin",
                                                "sub.bin", "train-1.bin"} | shards


def test_a_data_folder_without_the_marker_is_still_its_own(cli, tmp_path, prepared):
    """Folders prepared before the marker existed: a distclm manifest is proof enough (legacy)."""
    out = Path(shutil.copytree(prepared, tmp_path / "data"))
    (out / MARKER).unlink()
    r = cli("prepare", *DATA_ARGS, f"--data.dir={out}")
    assert r.code == 0 and "nothing to do" in r.out
    assert not (out / MARKER).exists()  # a run that writes nothing leaves the folder as it was
    r = cli("prepare", *DATA_ARGS[:-1], "--data.shard_blocks=50", f"--data.dir={out}", "--overwrite")
    assert r.code == 0, r.err
    assert kind_of(out) == "data" and (out / MARKER).exists()


# ---------------------------------------------------------------------------------------------
# export


def out_cases(root: Path, run: Path, data: Path) -> dict[str, tuple[Path, str]]:
    """--out -> the start of its refusal (after "--out OUT ")."""
    foreign = make(root / "mine", FOREIGN["a model folder"])
    return {
        "the run": (run, "is the run itself"),
        "RUN/checkpoints": (run / "checkpoints", f"is inside the run {run}"),
        "a checkpoint": (run / "checkpoints" / "step-2", f"is inside the run {run}"),
        "RUN/export/adapter": (run / "export" / "adapter", f"is inside the run {run}"),
        "a new folder inside the run": (run / "hf", f"is inside the run {run}"),
        "the run's parent": (run.parent, f"holds the run {run}"),
        "an ancestor of the run": (run.parent.parent, f"holds the run {run}"),
        "a data folder": (data, "is a prepared dataset (distclm prepare)"),
        "a folder holding a data folder": (make(root / "datasets", {"x.txt": "mine\n"}),
                                           "holds a prepared dataset (distclm prepare)"),
        "a foreign folder": (foreign, "holds 2 entries distclm did not write (config.json, pytorch_model.bin)"),
        # (the writable check that every output gets sees a file first: its own wording, "--out=PATH: ...")
        "a file": (make(root, {"file.txt": "x"}) / "file.txt", "is a file, not a folder"),
        "a link to an earlier export": (root / "link", "exists and is not a folder (a file or a link)"),
    }


CASES = ["the run", "RUN/checkpoints", "a checkpoint", "RUN/export/adapter", "a new folder inside the run",
         "the run's parent", "an ancestor of the run", "a data folder", "a folder holding a data folder",
         "a foreign folder", "a file", "a link to an earlier export"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("overwrite", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["", "overwrite"])
def test_export_refuses_what_is_not_an_earlier_export(cli, tmp_path, trained, prepared, case, overwrite):
    root = tmp_path / "root"
    run = copy_run(trained, root)
    data = Path(shutil.copytree(prepared, root / "data"))
    shutil.copytree(prepared, root / "datasets" / "pydoc")
    (root / "link").symlink_to(run / "export")
    out, says = out_cases(root, run, data)[case]
    before = tree(tmp_path)
    line = cli("export", run, "--out", out, *(["--overwrite"] if overwrite else [])).error_line()
    assert line.startswith((f"distclm: error: --out {out} {says}", f"distclm: error: --out={out}: {out} {says}")), line
    assert tree(tmp_path) == before


def test_export_into_the_current_folder_is_refused(cli, tmp_path, trained, monkeypatch):
    run = copy_run(trained, tmp_path)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)  # empty, and not holding the run: still refused, it is where the user stands
    before = tree(tmp_path)
    assert "--out . is the current folder" in cli("export", run, "--out", ".").error_line()
    assert tree(tmp_path) == before


def test_a_foreign_folder_at_the_temporary_name_is_refused(cli, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    make(tmp_path, {".tmp-hf/mine.txt": "mine\n"})
    before = tree(tmp_path)
    line = cli("export", run, "--out", tmp_path / "hf").error_line()
    assert f"{tmp_path / '.tmp-hf'}: distclm needs this name for a temporary folder" in line
    assert tree(tmp_path) == before


def test_reexport_replaces_an_earlier_export_and_marks_it(cli, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    out = tmp_path / "hf"
    assert cli("export", run, "--out", out).code == 0
    assert kind_of(out) == "export"
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(b"stale")  # an older export's weights
    assert cli("export", run, "--out", out).code == 0
    assert (out / "model.safetensors").read_bytes() == weights
    assert (out / "model.safetensors").read_bytes() == (run / "export" / "model.safetensors").read_bytes()
    assert kind_of(run / "export") == "export"  # the training's own export is marked too
    # ...but not one that now holds a run or a dataset put inside it
    make(out, {"inner/config.yaml": "x\n", "inner/checkpoints/": ""})
    before = tree(tmp_path)
    line = cli("export", run, "--out", out).error_line()
    assert f"--out {out} is an earlier export, but {out / 'inner'} inside it is a run dir" in line
    assert tree(tmp_path) == before


def test_export_into_the_runs_own_export_written_before_the_marker(cli, tmp_path, trained):
    run = copy_run(trained, tmp_path)
    (run / "export" / MARKER).unlink()
    assert cli("export", run).code == 0
    assert kind_of(run / "export") == "export"


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_pruning_touches_only_its_own_step_names(tmp_path):
    from distclm.checkpoint import COMPLETE, prune

    ck = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        make(ck, {f"step-{step}/{COMPLETE}": f"{step}\n"})
    mine = {"step-foo/x": "mine\n", "step-4a/x": "mine\n", ".tmp-step-foo/x": "mine\n", "notes/x": "mine\n",
            "step-5.txt": "mine\n"}
    make(ck, {**mine, "step-9/partial": "", ".tmp-step-2/partial": ""})
    prune(tmp_path, keep_last=1)
    assert sorted(p.name for p in ck.iterdir()) == sorted(["step-3", *{n.split("/")[0] for n in mine}])


# ---------------------------------------------------------------------------------------------
# train: the run dir


@pytest.mark.parametrize("files", [FOREIGN["a model folder"], FOREIGN["nested folders"], {"config.yaml": "mine\n"}],
                         ids=["model folder", "nested", "a config.yaml of the user's"])
def test_train_refuses_a_folder_that_is_not_a_run_dir(cli, tmp_path, prepared, files):
    """In this process: the refusal comes before any process group (make_plan), nothing written."""
    folder = make(tmp_path / "mine", files)
    before = tree(tmp_path)
    line = cli("train", f"--data.dir={prepared}", *TRAIN_ARGS, "--train.max_steps=1", f"--run.dir={folder}",
               "--run.overwrite=true").error_line()
    n = len(os.listdir(folder))
    assert f"--run.dir={folder} holds {n} entr{'y' if n == 1 else 'ies'} distclm did not write" in line
    assert tree(tmp_path) == before


def test_train_refuses_a_data_folder_as_its_run_dir(cli, tmp_path, prepared):
    data = Path(shutil.copytree(prepared, tmp_path / "data"))
    before = tree(tmp_path)
    line = cli("train", f"--data.dir={data}", *TRAIN_ARGS, "--train.max_steps=1", f"--run.dir={data}").error_line()
    assert line.endswith(f"--run.dir={data} is a prepared dataset (distclm prepare), not a run dir (distclm train); "
                         f"choose another --run.dir")
    assert tree(tmp_path) == before


def lock_of(holder: Holder) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(holder)) + "\n"


@pytest.fixture
def sleeper():
    """A live process of this host, to stand for a training job that holds a lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.slow  # real processes or many rounds: make test, not test-fast
def test_a_second_job_is_refused_naming_the_holder(tmp_path, trained, prepared, sleeper):
    run = copy_run(trained, tmp_path)
    holder = Holder(socket.gethostname(), sleeper.pid, "other-job", time.time(), Holder.me().boot_id)
    (run / LOCK).write_text(lock_of(holder))
    before = tree(tmp_path)
    line = run_cli("train", f"--data.dir={prepared}", *TRAIN_ARGS, "--train.max_steps=3",
                   f"--run.dir={run}").error_line()
    assert f"--run.dir={run} is in use: a training job holds it (pid {sleeper.pid} on host {socket.gethostname()}" \
        in line
    assert tree(tmp_path) == before
    # distclm export of a run being trained is refused too: it would read checkpoints the job prunes
    line = run_cli("export", run, "--out", tmp_path / "hf").error_line()
    assert f"export: {run} is being trained (pid {sleeper.pid} on host {socket.gethostname()}" in line
    assert tree(tmp_path) == before


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow  # a whole training run (~10 s or more): CI runs it, test-fast does not
@pytest.mark.parametrize("how", ["dead pid on this host", "old lease of another host"])
def test_a_stale_lock_is_taken_over_and_that_is_said(tmp_path, trained, prepared, how):
    run = copy_run(trained, tmp_path)
    if how == "dead pid on this host":
        stale = Holder(socket.gethostname(), dead_pid(), "gone", time.time(), Holder.me().boot_id)
    else:
        stale = Holder("node-7", os.getpid(), "gone", time.time() - 10 * REFRESH_S, "another-boot")
    (run / LOCK).write_text(lock_of(stale))
    r = run_cli("train", f"--data.dir={prepared}", *TRAIN_ARGS, "--train.max_steps=2", f"--run.dir={run}")
    assert r.code == 0, r.err
    said = [line for line in r.out.splitlines() if line.startswith("lock: took over the stale lock")]
    assert len(said) == 1 and f"pid {stale.pid} on host {stale.host}" in said[0], r.out
    assert "resumed from" in r.out and not (run / LOCK).exists()  # released at the end


@pytest.mark.slow  # a whole training run (~10 s or more): CI runs it, test-fast does not
def test_the_lock_is_released_on_a_refusal_and_on_sigterm(tmp_path, trained, prepared):
    run = copy_run(trained, tmp_path)
    r = run_cli("train", f"--data.dir={prepared}", *TRAIN_ARGS, "--train.max_steps=3", "--train.lr=1e-3",
                f"--run.dir={run}")
    assert "holds another configuration" in r.error_line()
    assert not (run / LOCK).exists()
    fresh = tmp_path / "fresh"
    r = run_cli("train", f"--data.dir={prepared}", *TRAIN_ARGS, "--train.max_steps=6", f"--run.dir={fresh}",
                env=child_env(hooks={"DISTCLM_TEST_SIGTERM_AT_STEP": "2"}))
    assert r.code == 143, r.err
    assert kind_of(fresh) == "run" and not (fresh / LOCK).exists()


@pytest.mark.slow  # a whole training run (~10 s or more): CI runs it, test-fast does not
def test_a_run_dir_written_before_the_marker_resumes(tmp_path, trained, prepared):
    """Runs of older distclm versions: config.yaml beside checkpoints/ is proof enough (legacy)."""
    run = copy_run(trained, tmp_path)
    (run / MARKER).unlink()
    r = run_cli("train", f"--data.dir={prepared}", *TRAIN_ARGS, "--train.max_steps=2", f"--run.dir={run}")
    assert r.code == 0, r.err
    assert "resumed from" in r.out and kind_of(run) == "run" and (run / MARKER).exists()


@pytest.mark.slow  # two training processes at once
def test_two_real_jobs_into_one_run_dir(tmp_path, prepared):
    run = tmp_path / "run"
    first = start_cli("train", f"--data.dir={prepared}", *TRAIN_ARGS, "--train.max_steps=200", f"--run.dir={run}",
                      env=child_env(hooks={"DISTCLM_TEST_SLOW_FORWARD": "all:0.2"}))
    try:
        deadline = time.monotonic() + 120
        while not (run / LOCK).exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        second = run_cli("train", f"--data.dir={prepared}", *TRAIN_ARGS, "--train.max_steps=200", f"--run.dir={run}")
        assert f"(pid {first.pid} on host {socket.gethostname()}" in second.error_line()
        assert json.loads((run / LOCK).read_text())["pid"] == first.pid
    finally:
        first.kill()
        first.communicate()


# ---------------------------------------------------------------------------------------------
# the lock itself


@pytest.mark.slow  # real processes or many rounds: make test, not test-fast
def test_another_hosts_fresh_lease_is_waited_for_then_taken_over(tmp_path):
    """A pod killed outright and restarted elsewhere must resume, not fail: its lease runs out, then it is taken."""
    other = Holder("node-7", 12345, "killed-pod", time.time(), "another-boot", stale_after_s=1.5)
    (tmp_path / LOCK).write_text(lock_of(other))
    said = []
    t0 = time.monotonic()
    lock = RunLock.acquire(tmp_path, say=said.append)
    assert 1.0 < time.monotonic() - t0 < 5
    assert said[0].startswith(f"lock: {tmp_path / LOCK} is held by pid 12345 on host node-7; waiting up to")
    assert said[1].startswith(f"lock: took over the stale lock {tmp_path / LOCK} of pid 12345 on host node-7")
    mine = json.loads((tmp_path / LOCK).read_text())
    assert (mine["pid"], mine["host"]) == (os.getpid(), socket.gethostname())
    lock.refresh()
    assert json.loads((tmp_path / LOCK).read_text())["refreshed"] >= mine["refreshed"]
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_lock_taken_over_by_another_job_is_not_removed_by_the_old_holder(tmp_path):
    lock = RunLock.acquire(tmp_path)
    (tmp_path / LOCK).write_text(lock_of(Holder("node-7", 1, "newer-job", time.time(), "b")))
    lock.refresh()
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "newer-job"


@pytest.mark.slow  # real processes or many rounds: make test, not test-fast
def test_of_jobs_taking_over_one_stale_lock_at_once_exactly_one_wins(tmp_path):
    """Threads of this process stand for the jobs: each sees the other's new lock as held (same pid, alive)."""
    from concurrent.futures import ThreadPoolExecutor

    from distclm.errors import UserError

    for attempt in range(20):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        (folder / LOCK).write_text(lock_of(Holder(socket.gethostname(), dead_pid(), "gone", time.time(),
                                                  Holder.me().boot_id)))

        def take(_):
            try:
                return RunLock.acquire(folder, say=lambda line: None)
            except UserError as exc:
                return str(exc)

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(take, range(6)))
        locks = [g for g in got if isinstance(g, RunLock)]
        assert len(locks) == 1 and all("is in use" in g for g in got if isinstance(g, str)), got
        assert json.loads((folder / LOCK).read_text())["token"] == locks[0].holder.token
        assert [p.name for p in folder.iterdir()] == [LOCK]  # nothing left aside
        locks[0].release()


def test_a_folder_filled_while_the_export_runs_is_not_replaced(cli, tmp_path, trained, monkeypatch):
    """Checked again right before the rename: what --out holds then, not only when the export began."""
    run, out = copy_run(trained, tmp_path), tmp_path / "hf"
    copytree = shutil.copytree

    def user_writes_meanwhile(src, dst, **kw):
        make(out, {"mine.txt": "written while the export ran\n"})
        return copytree(src, dst, **kw)

    monkeypatch.setattr(shutil, "copytree", user_writes_meanwhile)
    line = cli("export", run, "--out", out).error_line()
    assert f"--out {out} holds 1 entry distclm did not write (mine.txt)" in line
    assert tree(out) == {"mine.txt": hashlib.sha256(b"written while the export ran\n").hexdigest()}
    assert not (tmp_path / ".tmp-hf").exists()  # the temporary copy went
