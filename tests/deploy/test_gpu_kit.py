"""bench/gpu.py --dry-run: the GPU proof kit's every section runs on CPU at tiny sizes, so it cannot rot before
someone runs it on a GPU. Its numbers are checked for what holds on any device: the chunked loss equals the
model's own, ddp/zero2/zero3 agree step by step, a kernel is named for both attention paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.env import child_env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # every section of bench/gpu.py on CPU: short trainings, ~50 s
def test_gpu_kit_dry_run_writes_every_section(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", f"--out={tmp_path}"],
                          env=child_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["dry_run"] is True and res["versions"]["torch"] and res["versions"]["deepspeed"]
    layers = {r["loss"]: r for r in res["loss_layers"]}
    assert "skipped" in layers["liger"]  # liger-kernel needs CUDA
    chunked, own = layers["chunked"], layers["own"]
    # Same init, same batch: the fused chunked loss is the model's own loss (fp32).
    assert abs(chunked["first_loss"] - own["first_loss"]) < 1e-4, (chunked["first_loss"], own["first_loss"])
    assert chunked["tokens_per_s"] > 0 and chunked["step_ms_cuda_events"] is None and chunked["mfu"] is None
    attention = {r["attention"]: r for r in res["attention"]}
    assert set(attention) == {"cross", "within"} and all(r["kernels"] for r in attention.values())
    strategies = {r["strategy"]: r for r in res["strategies"]}
    assert list(strategies) == ["ddp", "zero2", "zero3"]
    steps = res["size"]["strategy_steps"]
    for r in strategies.values():
        assert len(r["losses"]) == steps and r["within_tolerance"], r
        assert r["steps_per_s"] > 0 and r["peak_bytes"] > 0
    assert res["trainer"]["ratio"] > 0 and res["trainer"]["block"] == 128
    md = (tmp_path / "gpu.md").read_text()
    for heading in ("## Loss layer", "## Attention", "transformers.Trainer", "ddp vs zero2 vs zero3"):
        assert heading in md
