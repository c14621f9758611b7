"""On a CUDA machine: one process training on the GPU computes what it computes on the CPU.

`distclm train` picks the GPU whenever one is visible (the engine's device choice), so the same command with
`CUDA_VISIBLE_DEVICES=""` is the CPU reference. fp32 on both (`auto` would be bf16 on the GPU), gpt2-tiny (no
dropout), 3 steps of global batch 4 x 64 tokens. Skipped cleanly without CUDA (marker `gpu`).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.env import child_env
from tests.support.runs import read_metrics, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = 3
ARGS = (f"--train.max_steps={STEPS}", "--train.micro_batch_size=4", "--train.lr=1e-3", "--train.warmup_steps=1",
        "--train.seed=3", "--train.precision=fp32", "--eval.max_blocks=16")


def test_three_steps_on_cuda_equal_the_same_steps_on_the_cpu(tmp_path, pydoc_blocks):
    train(1, tmp_path / "cuda", pydoc_blocks, *ARGS)
    train(1, tmp_path / "cpu", pydoc_blocks, *ARGS, env=child_env(CUDA_VISIBLE_DEVICES=""))
    on_gpu, on_cpu = read_metrics(tmp_path / "cuda"), read_metrics(tmp_path / "cpu")
    for step in range(1, STEPS + 1):
        # fp32 on both; what differs is the order of summation in the kernels (and liger's loss when installed)
        assert on_gpu[step]["loss"] == pytest.approx(on_cpu[step]["loss"], rel=1e-3), step
    ev_gpu, ev_cpu = read_metrics(tmp_path / "cuda", "eval"), read_metrics(tmp_path / "cpu", "eval")
    assert ev_gpu[STEPS]["eval_loss"] == pytest.approx(ev_cpu[STEPS]["eval_loss"], rel=1e-3)
