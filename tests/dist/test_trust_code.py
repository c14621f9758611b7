"""Rule 2 of issue 28, no code from files: a pickle swapped into any file of a checkpoint (DDP's optimizer.pt,
ZeRO's model states and optimizer partitions, a universal checkpoint's files) is refused on resume and on export
with one line naming the file, exit 2, and its code never runs. Real gloo jobs on the shared training runs, copied
before they are tampered with; every rank started by hand (tests/support/ranks.py) so each one's code is seen."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.support.cli import free_port, run_cli
from tests.support.payload import plant
from tests.support.ranks import rank_env, run_ranks
from tests.support.runs import CKPT, ONE, SHARED, TWO


def resumable_copy(shared, name: str, tmp_path: Path) -> Path:
    """The shared run copied, its last checkpoint dropped: resume=auto then loads step-10 and would train on."""
    run = shutil.copytree(shared.get(name), tmp_path / name)
    shutil.rmtree(run / "checkpoints" / "step-20")
    return run


def refused(line: str, path: Path, marker: Path) -> None:
    assert f"refusing to load {path}: it holds " in line, line
    assert not marker.exists(), "the payload ran"


def train_args(name: str, run: Path, data: Path, *extra: str) -> list[str]:
    _, args = SHARED[name]
    return ["train", f"--data.dir={data}", "--model.name=gpt2-tiny", f"--run.dir={run}", "--log.every_steps=1",
            *args, "--run.resume=auto", *extra]


def resume_on_two(name: str, run: Path, data: Path) -> list:
    port, cmd = free_port(), [sys.executable, "-m", "distclm.cli", *train_args(name, run, data)]
    return run_ranks([cmd, cmd], [rank_env(r, 2, port) for r in range(2)], timeout=300)


@pytest.mark.parametrize("name,file", [
    ("ckpt-ddp-2proc", "optimizer.pt"),
    ("ckpt-zero2-2proc", "deepspeed/state/mp_rank_00_model_states.pt"),
    ("ckpt-zero3-2proc", "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
], ids=["ddp-optimizer", "zero2-model-states", "zero3-optim-partition"])
def test_a_pickle_in_a_checkpoint_is_refused_on_resume(shared, pydoc_blocks, tmp_path, name, file):
    run, marker = resumable_copy(shared, name, tmp_path), tmp_path / "marker"
    bad = plant(run / "checkpoints" / "step-10" / file, marker)
    for p in resume_on_two(name, run, pydoc_blocks):  # every rank, the same one line: none waits on another
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
        errors = [line for line in p.stderr.splitlines() if line.startswith("distclm: error: ")]
        assert len(errors) == 1, p.stderr[-3000:]
        refused(errors[0], bad, marker)
    assert not (run / "checkpoints" / "step-11").exists()


def test_a_pickle_in_shards_or_their_universal_copy_is_refused_on_another_world(shared, pydoc_blocks, tmp_path):
    """2 -> 1 process: ds_to_universal reads the shards (refused there), then the universal files are read."""
    name = "ckpt-zero3-2proc"
    run, marker = resumable_copy(shared, name, tmp_path), tmp_path / "marker"
    ckpt = run / "checkpoints" / "step-10"
    one = [a for a in train_args(name, run, pydoc_blocks) if a not in TWO] + list(ONE)
    original = ckpt / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    kept = shutil.copy(original, tmp_path / "kept.pt")
    plant(original, marker, bare=True)
    refused(run_cli(*one).error_line(), original, marker)
    assert not (ckpt / "universal").exists()
    shutil.copy(kept, original)
    # The conversion alone (in this process), then a pickle in the universal checkpoint it wrote.
    from distclm.checkpoint import ensure_universal

    class RankZero:
        is_main = True

        def barrier(self):
            pass

    universal = ensure_universal(RankZero(), ckpt)
    bad = plant(sorted((universal / "state" / "zero").rglob("exp_avg.pt"))[0], marker)
    refused(run_cli(*one).error_line(), bad, marker)


def test_export_of_a_zero3_run_refuses_a_pickled_shard(shared, tmp_path):
    run, marker = resumable_copy(shared, "ckpt-zero3-2proc", tmp_path), tmp_path / "marker"
    shutil.rmtree(run / "export")
    bad = plant(run / "checkpoints" / "step-10" / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_model_states.pt",
                marker)
    refused(run_cli("export", run, "--out", tmp_path / "hf").error_line(), bad, marker)
    assert not (tmp_path / "hf").exists()
