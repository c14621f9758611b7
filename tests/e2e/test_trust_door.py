"""Validation at the door (issue 28, rule 5, and rule 8's eval): every number in range, every output writable, a
text prompt file, a full disk at export and an eval with no blocks: one line, exit 2, before any work, nothing
created and every user file byte-identical.

The bad values come from the config tree itself (each numeric field's `bound=`), so a new number without a bound
fails here, and one with a bound is tried at its edges.

Read-only outputs as root: chmod does not stop root, so a folder is made read-only three ways that do: a tmpfs
mounted read-only (EROFS), a folder made immutable with `chattr +i` (EPERM), and a regular file in the way
(FILE/x, ENOTDIR, no root needed). The first two skip where mount/chattr fail.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from distclm import config
from distclm.errors import UserError
from tests.support.cli import run_cli

# ---------------------------------------------------------------------------------------------
# Helpers


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under `roots` -> its sha256 ("dir" for a folder): what "byte-identical" compares."""
    out = {}
    for root in roots:
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"distclm-{uuid.uuid4().hex[:6]}", str(path)],
                          capture_output=True).returncode == 0


@contextmanager
def read_only_place(tmp_path: Path, how: str):
    """A path nothing can be written under, made so in one of the ways that stop root too."""
    if how == "read-only mount":
        place = tmp_path / "ro"
        if not _mount(place, "ro,size=1m"):
            pytest.skip("cannot mount a tmpfs here (needs root)")
        try:
            yield place
        finally:
            subprocess.run(["umount", str(place)], check=True)
    elif how == "immutable folder":
        place = tmp_path / "immutable"
        place.mkdir()
        (place / "mine.txt").write_text("a user's file\n")
        if subprocess.run(["chattr", "+i", str(place)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i does not work here (needs root and a file system with attributes)")
        try:
            yield place
        finally:
            subprocess.run(["chattr", "-i", str(place)], check=True)
    else:  # a regular file where a folder would have to be
        place = tmp_path / "a-file.txt"
        place.write_text("a user's file, not a folder\n")
        yield place


# ---------------------------------------------------------------------------------------------
# 1. Every number in range, from the tree


def numeric_fields() -> list[tuple[str, object, bool]]:
    """(dotted key, dataclass field, is an integer) of every int/float field of the tree."""
    out = []
    for key, (f, tp) in config.field_specs().items():
        base, _ = config.base_type(tp)
        if base in (int, float):
            out.append((key, f, base is int))
    return out


def bad_values(bound, integer: bool) -> list[str]:
    """Values just outside `bound`, and nan/inf for a float: what each field must refuse."""
    if bound is None:
        return ["<no bound declared>"]
    step, shown = (1, lambda x: str(int(x))) if integer else (0.5, lambda x: repr(float(x)))
    out = [] if integer else ["nan", "inf", "-inf"]
    if bound.low is not None:
        out.append(shown(bound.low if bound.low_open else bound.low - step))
    if bound.high is not None:
        out.append(shown(bound.high if bound.high_open else bound.high + step))
    return out


BAD = [(key, value) for key, f, integer in numeric_fields() for value in bad_values(f.metadata.get("bound"), integer)]


def test_the_table_covers_the_tree():
    keys = {key for key, _ in BAD}
    assert len(numeric_fields()) >= 40 and keys == {key for key, _, _ in numeric_fields()}
    for must in ("train.lr", "train.weight_decay", "train.max_grad_norm", "train.warmup_steps", "train.epochs",
                 "gen.temperature", "gen.top_k", "gen.top_p", "eval.max_blocks", "data.val_fraction", "plan.margin"):
        assert must in keys, must


@pytest.mark.parametrize("key, f, integer", numeric_fields(), ids=[k for k, _, _ in numeric_fields()])
def test_every_numeric_field_declares_a_bound_that_its_default_keeps(key, f, integer):
    bound = f.metadata.get("bound")
    assert bound is not None, f"--{key}: a number needs its bound beside it (F(..., bound=at_least(...)))"
    assert f.default is None or bound.allows(f.default), (key, f.default)


def command_for(key: str, tmp: Path, data: Path) -> list[str]:
    """The command that uses the flag's section, with valid inputs, and outputs under `tmp` (none may appear)."""
    section = key.split(".")[0]
    return {
        "data": ["prepare", "--data.source=pydoc", f"--data.dir={tmp}/data"],
        "eval": ["eval", "--model.name=gpt2-tiny", f"--data.dir={data}", f"--eval.output={tmp}/eval.json"],
        "gen": ["generate", "--model.name=gpt2-tiny", "--prompt=hello"],
        "plan": ["plan", "--model.name=gpt2-tiny", "--plan.world=2", f"--plan.output={tmp}/plan.json"],
        "run": ["run", "--preset=demo", f"--data.dir={tmp}/data", f"--run.dir={tmp}/run"],
    }.get(section, ["train", f"--data.dir={data}", "--model.name=gpt2-tiny", f"--run.dir={tmp}/run"])


@pytest.mark.parametrize("key, value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_a_number_out_of_range_is_refused_before_anything_starts(cli, pydoc_blocks, tmp_path, key, value):
    f, tp = config.field_specs()[key]
    bound = f.metadata.get("bound")
    assert bound is not None, f"--{key} has no bound"
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("the user's own file\n")
    before = snapshot(user, pydoc_blocks)
    line = cli(*command_for(key, user, pydoc_blocks), f"--{key}={value}").error_line()
    integer = config.base_type(tp)[0] is int
    assert line == f"distclm: error: --{key}={value}: must be {bound.describe(integer)}", line
    assert snapshot(user, pydoc_blocks) == before  # no run dir, data folder, result or plan; nothing changed


@pytest.mark.parametrize("flag, value, expected", [
    ("train.lr", "inf", "--train.lr=inf: must be a finite number > 0"),
    ("train.lr", "nan", "--train.lr=nan: must be a finite number > 0"),
    ("train.weight_decay", "nan", "--train.weight_decay=nan: must be a finite number >= 0"),
    ("train.epochs", "0", "--train.epochs=0: must be an integer >= 1"),
    ("train.max_grad_norm", "-1", "--train.max_grad_norm=-1: must be a finite number >= 0 (0 = off)"),
])
def test_the_issue_cases_in_a_real_process_leave_no_run_dir(pydoc_blocks, tmp_path, flag, value, expected):
    """Today --train.lr=inf trained to NaN weights with exit 0; --train.epochs=0 left a run dir behind."""
    run_dir = tmp_path / "run"
    r = run_cli("train", f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", f"--run.dir={run_dir}",
                "--train.max_steps=2", f"--{flag}={value}", timeout=120)
    assert r.error_line() == f"distclm: error: {expected}"
    assert not run_dir.exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_temperature_zero_says_how_to_get_greedy(cli, value):
    line = cli("generate", "--model.name=gpt2-tiny", "--prompt=hello", f"--gen.temperature={value}").error_line()
    assert f"--gen.temperature={value}: must be a finite number > 0" in line
    assert "--gen.do_sample=false for greedy" in line


def test_a_bad_number_in_a_config_file_names_the_file_and_key(cli, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: .inf\ngen:\n  top_p: 1.5\n")
    line = cli("train", "--config", path, "--model.name=gpt2-tiny").error_line()
    assert f"'train.lr' in {path}: must be a finite number > 0, got inf" in line


def test_a_config_built_in_code_is_checked_too():
    cfg = config.Config()
    cfg.gen.top_k = -1
    with pytest.raises(UserError, match=r"--gen.top_k=-1: must be an integer >= 0 \(0 = off\)"):
        config.validate(cfg)


# ---------------------------------------------------------------------------------------------
# 2. Every output writable, before the work that produces it

HOW = ["read-only mount", "immutable folder", "file in the way"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, pydoc_blocks) -> Path:
    """A 1-step gpt2-tiny run with a complete checkpoint (the thing `export` reads)."""
    run_dir = tmp_path_factory.mktemp("door-run") / "run"
    run_cli("train", f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", f"--run.dir={run_dir}",
            "--train.max_steps=1", "--train.micro_batch_size=2", "--eval.at_end=false", check=True, timeout=300)
    return run_dir


OUTPUTS = {  # name -> (flag, argv for an output at OUT)
    "prepare": ("--data.dir", lambda out, d, run: ["prepare", "--data.source=pydoc", f"--data.dir={out}"]),
    "train": ("--run.dir", lambda out, d, run: ["train", f"--data.dir={d}", "--model.name=gpt2-tiny",
                                                f"--run.dir={out}", "--train.max_steps=1"]),
    "eval": ("--eval.output", lambda out, d, run: ["eval", "--model.name=gpt2-tiny", f"--data.dir={d}",
                                                   f"--eval.output={out}"]),
    "export": ("--out", lambda out, d, run: ["export", run(), f"--out={out}"]),
    "plan": ("--plan.output", lambda out, d, run: ["plan", "--model.name=gpt2-tiny", f"--plan.output={out}"]),
    "run": ("--run.dir", lambda out, d, run: ["run", "--preset=demo", f"--data.dir={out.parent}/demo-data",
                                              f"--run.dir={out}"]),
}


@pytest.mark.parametrize("how", HOW)
# export's cases train a run first (a process, ~6 s): make test runs them, test-fast the others
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "export" else n for n in OUTPUTS])
def test_an_output_that_cannot_be_written_is_refused_first(cli, request, pydoc_blocks, tmp_path, name, how):
    flag, argv = OUTPUTS[name]
    with read_only_place(tmp_path, how) as place:
        out = place / "out"
        # export's run is trained (only when asked, once per module) before the snapshot
        args = argv(out, pydoc_blocks, lambda: request.getfixturevalue("trained_run"))
        before = snapshot(tmp_path, pydoc_blocks)
        r = cli(*args)
        line = r.error_line()
        assert f"{flag}={out}: " in line, line
        what = "is a file, not a folder" if how == "file in the way" else "cannot write in"
        assert what in line and str(place) in line, line
        assert "perplexity" not in r.out and "eval:" not in r.out  # refused before any work, not after it
        assert snapshot(tmp_path, pydoc_blocks) == before
        assert not out.exists() and not list(tmp_path.glob("**/.distclm-write-probe-*"))


def test_a_complete_read_only_data_folder_is_still_reused(cli, tmp_path):
    """Only a prepare that would write is refused: a complete folder on read-only storage is used as it is."""
    data = tmp_path / "data"
    args = ("prepare", "--data.source=pydoc", "--data.max_docs=30", "--data.block_size=64", f"--data.dir={data}")
    assert cli(*args).code == 0
    before = snapshot(data)
    if subprocess.run(["chattr", "+i", str(data)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i does not work here")
    try:
        r = cli(*args)
    finally:
        subprocess.run(["chattr", "-i", str(data)], check=True)
    assert r.code == 0 and "is complete with these settings" in r.out, r.err
    assert snapshot(data) == before


def test_an_output_that_is_a_folder_where_a_file_goes_is_refused(cli, tmp_path):
    (tmp_path / "plan.json").mkdir()
    line = cli("plan", "--model.name=gpt2-tiny", f"--plan.output={tmp_path / 'plan.json'}").error_line()
    assert f"--plan.output={tmp_path / 'plan.json'}: " in line and "is a folder, not a file" in line


# ---------------------------------------------------------------------------------------------
# 3. The prompt file is text


@pytest.mark.parametrize("kind, content, expected", [
    ("random bytes", bytes(range(128, 256)) * 4, "not UTF-8 text (byte 0x80 at offset 0)"),
    ("a gzip file", b"\x1f\x8b\x08\x00" + bytes(60), "not UTF-8 text (byte 0x8b at offset 1)"),
    ("NUL bytes in UTF-8", b"a prompt\n\x00\x00\x00\x00", "a binary file (a NUL byte at offset 9)"),
    ("a folder", None, "cannot read it"),
    ("missing", "missing", "no such file"),
])
def test_a_prompt_file_that_is_not_text_is_one_line(cli, tmp_path, kind, content, expected):
    path = tmp_path / "prompts.txt"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    before = snapshot(tmp_path)
    line = cli("generate", "--model.name=gpt2-tiny", f"--prompt-file={path}").error_line()
    assert f"--prompt-file={path}: {expected}" in line, line
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# 4. A full disk during export


@pytest.fixture
def small_disk(tmp_path, request):
    disk = tmp_path / "small"
    if not _mount(disk, f"size={getattr(request, 'param', '2m')}"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow  # trains a run first (trained_run)
def test_export_onto_a_disk_too_small_is_refused_before_writing(trained_run, small_disk):
    before = snapshot(trained_run)
    out = small_disk / "export"
    line = run_cli("export", trained_run, f"--out={out}", timeout=120).error_line()
    assert f"export to {out}: needs " in line and f"{small_disk} has " in line and "MB free" in line, line
    model = sorted((trained_run / "checkpoints").glob("step-*"))[-1] / "model"
    need = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    assert f"needs {need / 1e6:,.1f} MB" in line
    assert list(small_disk.iterdir()) == [] and snapshot(trained_run) == before


@pytest.mark.slow  # trains a run first (trained_run)
def test_a_disk_that_fills_during_the_copy_is_one_line_and_nothing_is_left(cli, trained_run, small_disk,
                                                                            monkeypatch):
    """The free-space check made to pass (as on a disk another writer fills meanwhile): the real copy hits ENOSPC on
    the 2 MB tmpfs, and what was written is removed."""
    import distclm.export

    monkeypatch.setattr(distclm.export, "free_bytes", lambda path: 10**12)
    before = snapshot(trained_run)
    out = small_disk / "export"
    line = cli("export", trained_run, f"--out={out}").error_line()
    assert f"export to {out}: the disk is full (no space left on device in {small_disk}" in line, line
    assert "it needs at least" in line and "nothing was kept" in line
    assert list(small_disk.iterdir()) == [] and snapshot(trained_run) == before


@pytest.mark.parametrize("small_disk", ["100k"], indirect=True)
def test_prepare_onto_a_full_disk_is_one_line_and_resumes_once_there_is_room(cli, small_disk, tmp_path):
    data = small_disk / "data"
    args = ("prepare", "--data.source=pydoc", "--data.block_size=64", f"--data.dir={data}")
    line = cli(*args).error_line()
    assert f"--data.dir={data}: the disk is full (no space left on device in " in line, line
    assert "not read as complete" in line and "prepare again" in line
    assert not (data / "manifest.json").exists()
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    assert cli(*args).code == 0
    reference = tmp_path / "reference"
    assert cli(*args[:-1], f"--data.dir={reference}").code == 0
    shards = lambda d: {p.name: p.read_bytes() for p in d.glob("*.bin")}  # noqa: E731
    assert shards(data) == shards(reference) and shards(data)
    assert (data / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()


def fill(disk: Path) -> None:
    """Write into `disk` until it is full (what stays is a user's file)."""
    with open(disk / "filler.bin", "wb", buffering=0) as fh:  # unbuffered: the last write fails, not the close
        try:
            while True:
                fh.write(b"x" * 4096)
        except OSError:
            pass


@pytest.mark.parametrize("small_disk", ["64k"], indirect=True)
@pytest.mark.parametrize("name", ["eval", "plan"])
def test_a_result_file_onto_a_full_disk_is_one_line_and_no_tmp_is_left(cli, pydoc_blocks, small_disk, name):
    fill(small_disk)
    before = snapshot(small_disk)
    out = small_disk / "result.json"
    args = {"eval": ["eval", "--model.name=gpt2-tiny", f"--data.dir={pydoc_blocks}", "--eval.max_blocks=2",
                     f"--eval.output={out}"],
            "plan": ["plan", "--model.name=gpt2-tiny", f"--plan.output={out}"]}[name]
    r = cli(*args)
    line = r.error_line()
    flag = {"eval": "--eval.output", "plan": "--plan.output"}[name]
    assert f"{flag}={out}: the disk is full (no space left on device in {small_disk}" in line, line
    assert "printed above; no file was written" in line
    assert ("perplexity: " in r.out) if name == "eval" else ("recommended" in r.out)
    assert snapshot(small_disk) == before  # no result.json, no result.json.tmp


# ---------------------------------------------------------------------------------------------
# 5. Eval with no blocks is refused, not nan


def test_eval_of_a_split_with_no_blocks_is_refused(cli, tmp_path):
    data = tmp_path / "data"
    assert cli("prepare", "--data.source=pydoc", "--data.max_docs=30", "--data.block_size=64",
               "--data.val_fraction=0", f"--data.dir={data}").code == 0
    before = snapshot(data)
    result = tmp_path / "result.json"
    r = cli("eval", "--model.name=gpt2-tiny", f"--data.dir={data}", f"--eval.output={result}")
    line = r.error_line()
    assert f"--data.dir={data}: its 'validation' split has 0 blocks" in line, line
    assert "--eval.split" in line and "--data.val_fraction" in line and "train (" in line
    assert "perplexity" not in r.out and not result.exists() and snapshot(data) == before
