"""`distclm plan` from the command line, and `--train.micro_batch_size=auto` in a real training run."""

from __future__ import annotations

import json
import re

import yaml

from distclm import plan as pm
from distclm.config import build_config
from distclm.plan_cli import resolve_auto_micro
from tests.support.cli import run_cli


def test_a_bad_device_memory_is_one_line_and_exit_2(cli):
    line = cli("plan", "--model.name=gpt2-tiny", "--plan.device_memory=eighty").error_line()
    assert "--plan.device_memory: expected a positive size like 80GB" in line and "'eighty'" in line


def test_plan_prints_the_parts_and_a_pick_and_writes_the_json(cli, tmp_path):
    out = tmp_path / "plan.json"
    r = cli("plan", "--model.name=llama-tiny", "--plan.world=4", "--plan.device_memory=2GB", "--plan.baseline=0.5GB",
            "--train.global_batch_size=32", f"--plan.output={out}")
    assert r.code == 0, r.err
    assert "per-rank peak of the given configuration (ddp, micro 8, accum 1)" in r.out
    assert "optimizer states" in r.out and "\n  * " in r.out and "recommended: " in r.out
    plan = json.loads(out.read_text())
    assert plan["given"]["world"] == 4 and plan["given"]["device_memory_bytes"] == 2 * 10**9
    assert {c["micro_batch_size"] * c["grad_accum"] for c in plan["configs"]} == {8}  # 32 blocks over 4 ranks
    assert plan["configs"][plan["recommended"]]["fits"]


def test_micro_auto_picks_the_largest_that_fits_and_keeps_the_global_batch(pydoc_prepared, tmp_path):
    """With the device's memory capped between what micro 1 and micro 24 need, the run takes the plan's largest
    fitting divisor of 24, accumulates to exactly 24 blocks a step, and reports predicted and measured peaks."""
    flags = {"model.name": "gpt2-tiny", "data.dir": str(pydoc_prepared), "train.micro_batch_size": "auto",
             "train.global_batch_size": 24}
    cfg = build_config(flags=flags)
    from distclm.model import preset_config
    from distclm.plan_cli import device_for

    arch, device = pm.arch_of(preset_config("gpt2-tiny")), device_for(cfg, 1, 1, here=True)
    peak = {m: pm.per_rank_peak(pm.memory_parts(arch, pm.Setup("ddp", "none", m, 24 // m, False, 1, 128, False, True),
                                                None, device), device) for m in (1, 24)}
    cap = int((peak[1] + 0.4 * (peak[24] - peak[1])) / 0.9)  # a 10% margin (the default)
    chosen = resolve_auto_micro(build_config(flags={**flags, "plan.device_memory": str(cap)}), 1, log=lambda _: None)
    micro = chosen.train.micro_batch_size
    assert 1 < micro < 24 and 24 % micro == 0 and chosen.train.global_batch_size == 24

    run = tmp_path / "run"
    r = run_cli("train", *(f"--{k}={v}" for k, v in flags.items()), f"--plan.device_memory={cap}", f"--run.dir={run}",
                "--train.max_steps=2", "--eval.max_blocks=2", check=True, timeout=300)
    assert f"micro-batch auto: {micro} (accumulation {24 // micro}, global batch 24)" in r.out
    assert re.search(r"memory after step 2: peak [0-9.]+ GB on rank 0, planned [0-9.]+ GB per rank \([0-9.]+x\)",
                     r.out), r.out  # the plan checked while the run goes on, not only at its end
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert saved["micro_batch_size"] == micro and saved["global_batch_size"] == 24
    memory = json.loads((run / "summary.json").read_text())["memory"]
    assert set(memory) == {"predicted_bytes", "peak_bytes"}
    assert 0.6 < memory["peak_bytes"] / memory["predicted_bytes"] < 1.6, memory


def test_micro_auto_without_a_global_batch_fixes_it_at_8_x_accum_x_world(pydoc_prepared):
    cfg = build_config(flags={"model.name": "gpt2-tiny", "data.dir": str(pydoc_prepared), "train.grad_accum": 3,
                              "train.micro_batch_size": "auto"})
    out = resolve_auto_micro(cfg, 2, log=lambda _: None)
    assert out.train.global_batch_size == 8 * 3 * 2 and 24 % out.train.micro_batch_size == 0
