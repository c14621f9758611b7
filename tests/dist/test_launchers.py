"""The same `distclm train` command line under every launcher gives the same run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tests.support.cli import free_port
from tests.support.env import REPO, child_env
from tests.support.runs import read_metrics

ARGS = ["--model.name=gpt2-tiny", "--train.max_steps=3", "--train.micro_batch_size=4", "--train.lr=1e-3",
        "--train.seed=3", "--log.every_steps=1", "--eval.max_blocks=16"]


def launched(launcher: list[str], data, run_dir, *extra) -> list[float]:
    cmd = [*launcher, "distclm.cli", "train", f"--data.dir={data}", f"--run.dir={run_dir}", *ARGS, *extra]
    proc = subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = read_metrics(run_dir)
    return [recs[s]["loss"] for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def torchrun_ddp(shared):
    recs = read_metrics(shared.get("launch-torchrun-ddp"))  # ARGS on 2 processes under torchrun
    return [recs[s]["loss"] for s in (1, 2, 3)]


@pytest.mark.extended  # tests/multinode runs the deepspeed launcher (no ssh) with ZeRO-2 across two hosts
def test_deepspeed_launcher_with_zero2(pydoc_blocks, tmp_path, torchrun_ddp):
    # The deepspeed launcher adds --local_rank=N before the command: accepted and ignored.
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(free_port()), "--module"]
    losses = launched(launcher, pydoc_blocks, tmp_path / "ds", "--train.strategy=zero2")
    np.testing.assert_allclose(losses, torchrun_ddp, atol=1e-4)
    assert (tmp_path / "ds" / "ds_config.json").exists()


@pytest.mark.extended  # CI runs torchrun everywhere and the deepspeed launcher in tests/multinode
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_accelerate_launch_config_carries_topology_only(pydoc_blocks, tmp_path, torchrun_ddp, strategy):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "launchers" / "accelerate" / "multi_cpu.yaml"), "--main_process_port", str(free_port()), "-m"]
    losses = launched(launcher, pydoc_blocks, tmp_path / strategy, f"--train.strategy={strategy}")
    np.testing.assert_allclose(losses, torchrun_ddp, atol=1e-4)
    assert (tmp_path / strategy / "ds_config.json").exists() == (strategy == "zero2")
