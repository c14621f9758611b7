"""One rank's footprint on this host, for the plan (distclm/plan_probe.py runs it as a process of its own and
caches what it prints): the imports a training rank makes, one rank of the Engine around a tiny model (set-up, a
step, a checkpoint) under ddp then zero2, and the CPU's matmul rate.

    python -m distclm.engine.probe   ->  {"baseline_bytes", "baseline_zero_bytes", "matmul_tflops"}
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

import accelerate  # noqa: F401 - what a training rank imports belongs to its baseline
import deepspeed  # noqa: F401
import psutil
import torch
import transformers  # noqa: F401

import distclm.train  # noqa: F401
from distclm.config import TrainConfig
from distclm.dist import end_process, free_port, own_process
from distclm.engine.core import Engine
from distclm.safe_load import forbid_code_from_files

STATES = 2 * 64 * 65 * 16  # the probe model's weights, gradients, DDP buckets/partitions and Adam states, at most


def matmul_tflops() -> float:
    """Sustained fp32 TFLOP/s of a 1024^3 matmul (2 * 1024^3 FLOPs per call) over half a second."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        a @ b
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t0) / 1e12


def peak() -> int:
    return max(psutil.Process().memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def rank(strategy: str) -> int:
    """One rank through distclm's Engine: set-up, a step, a checkpoint -> its peak less the model's states."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    engine = Engine.start(TrainConfig(strategy=strategy), 64)
    engine.wrap(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)), 1)
    with engine.micro_batch(last=True):
        engine.backward(engine.model(torch.randn(1, 64)).sum())
    engine.optimizer_step()
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_state(Path(tmp))
    engine.close()
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)  # the next Engine builds its own
    PartialState._reset_state()
    return peak() - STATES


if __name__ == "__main__":
    own_process()  # ended like a rank: a release that blocks is cut short by the grace (dist.work_done)
    forbid_code_from_files()  # as every distclm process: the checkpoint it writes and reads back loads weights-only
    rate = matmul_tflops()
    ddp = rank("ddp")
    print(json.dumps({"baseline_bytes": ddp, "baseline_zero_bytes": rank("zero2"), "matmul_tflops": rate}))
    end_process(0)  # it formed process groups: ended like a rank (dist.end_process), its caller waits on it
