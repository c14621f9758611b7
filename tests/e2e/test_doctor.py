"""`distclm doctor` on one process: versions, DeepSpeed ops, launcher environment, resolved config.
(Several ranks: tests/multinode/test_startup_checks.py and test_two_hosts.py.)"""

from __future__ import annotations

from importlib import metadata

import torch

from tests.support.cli import run_cli
from tests.support.env import child_env

# doctor imports deepspeed, whose loggers keep the streams of the moment: in a child process, not in pytest's.


def test_doctor_reports_versions_ops_env_and_config():
    env = child_env(GLOO_SOCKET_IFNAME="eth7", TORCH_EXTENSIONS_DIR="/nowhere/ext")
    r = run_cli("doctor", "--train.strategy=zero2", "--train.micro_batch_size=3", env=env)
    assert r.code == 0, r.err
    out = r.out
    for name in ("torch", "CUDA", "NCCL", "deepspeed", "accelerate", "transformers"):
        assert f"\n  {name} " in out, name
    assert torch.__version__ in out and metadata.version("deepspeed") in out and metadata.version("accelerate") in out
    assert metadata.version("transformers") in out
    # DeepSpeed's op table: what is prebuilt, what can be JIT-built here, what the JIT cache holds.
    assert "deepspeed ops (accelerator" in out and "JIT cache /nowhere/ext" in out
    ops = {line.split()[0]: line.split()[1:] for line in out.split("deepspeed ops")[1].split("\n\n")[0].splitlines()[2:]}
    assert ops["cpu_adam"][:2] == ["no", "yes"] or ops["cpu_adam"][0] == "yes"
    assert "fused_adam" in ops
    # The launcher environment and the resolved config (flags applied).
    assert any(line.split() == ["GLOO_SOCKET_IFNAME", "eth7"] for line in out.splitlines())
    assert "backend gloo, precision no, DeepSpeed ZeRO-2 (--train.strategy=zero2)" in out
    assert "micro_batch_size: 3" in out
    assert "one process: nothing to all-reduce" in out


def test_doctor_says_when_the_config_cannot_run_here():
    r = run_cli("doctor", "--train.backend=nccl")
    assert r.code == 0
    assert "cannot run as configured here: --train.backend=nccl needs CUDA" in r.out


def test_doctor_refuses_hand_written_rank_variables(cli, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    line = cli("doctor").error_line()
    assert "WORLD_SIZE=2 is set but RANK and LOCAL_RANK are not" in line
