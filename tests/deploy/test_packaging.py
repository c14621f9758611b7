"""The wheel is the product: built, installed into a fresh virtual environment outside the repository, it trains
ZeRO-2 on 2 processes from a folder that is not the repository, with its DeepSpeed templates as package data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support.cli import free_port
from tests.support.env import LAUNCHER_VARS, REPO


@pytest.mark.slow  # two training processes under torchrun
def test_wheel_in_a_fresh_venv_trains_zero2_on_two_processes(tmp_path, pydoc_blocks):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("distclm-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies (torch, deepspeed, ...) come from this environment's site-packages, appended after the new
    # venv's own: installing them again would only re-download what is tested here. distclm comes from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    assert (site / "distclm" / "ds_configs" / "zero2.json").is_file()  # package data, not a repository path

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_VARS, "PYTHONPATH", "DISTCLM_DS_CONFIGS")}
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "distclm" / "torch_extensions"))
    where = subprocess.run([str(python), "-c", "import distclm; print(distclm.__file__)"], cwd=elsewhere, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(site)), where
    proc = subprocess.run([str(python), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "-m", "distclm.cli", "train",
                           f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", "--run.dir=run",
                           "--train.strategy=zero2", "--train.max_steps=3", "--train.micro_batch_size=4",
                           "--eval.max_blocks=16", "--log.every_steps=1"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = elsewhere / "run"
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps == [1, 2, 3] and (run / "export" / "model.safetensors").exists()
