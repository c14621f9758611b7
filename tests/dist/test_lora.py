"""LoRA through peft with every strategy: a small trainable adapter on a frozen base, checkpointed alone, resumed
exactly, exported merged (export/) and alone (export/adapter/). The known ZeRO-3 failures are checked for:
an empty adapter file, lora_B stuck at zero, an adapter lost on resume.

Runs (gpt2-tiny, r=8, global batch 8 blocks of 64 tokens, 20 steps, lr 1e-2 (LoRA's usual 10x), checkpoints at 10 and 20):
  ddp-2     2 processes, DDP: the uninterrupted reference
  zero3-2   2 processes, ZeRO-3
  sigterm   2 processes, DDP, SIGTERM on rank 0 during step 10 (exit 143), relaunched: the same 20 steps
  zero3-1   1 process, ZeRO-3, resumed from zero3-2's step-10 (another world size: universal checkpoint)
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from tests.support.cli import run_cli
from tests.support.env import child_env
from tests.support.runs import ONE, TWO, read_metrics, train, weights

LORA = ("--lora.r=8", "--train.max_steps=20", "--train.lr=1e-2", "--train.warmup_steps=2", "--train.seed=3",
        "--train.save_every=10", "--eval.max_blocks=32", "--eval.batch_size=16")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pydoc_blocks):
    root = tmp_path_factory.mktemp("lora")
    train(2, root / "ddp-2", pydoc_blocks, *LORA, *TWO)
    train(2, root / "zero3-2", pydoc_blocks, *LORA, *TWO, "--train.strategy=zero3")
    args = [f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", f"--run.dir={root / 'sigterm'}",
            "--log.every_steps=1", *LORA, *TWO]
    stopped = run_cli("train", *args, nproc=2, env=child_env(hooks={"DISTCLM_TEST_SIGTERM_AT_STEP": "10"}))
    assert re.search(r"exitcode\s*:\s*143", stopped.err), stopped.err[-3000:]  # torchrun reports the worker's 143
    resumed = run_cli("train", *args, nproc=2, check=True)
    return root, stopped, resumed


def losses(run_dir, steps=range(1, 21)) -> list[float]:
    recs = read_metrics(run_dir)
    return [recs[s]["loss"] for s in steps]


def test_only_the_adapter_trains_and_checkpoints_hold_it_alone(runs):
    root, _, _ = runs
    params = json.loads((root / "ddp-2" / "summary.json").read_text())["params"]
    assert params["trainable"] == 2 * 8 * (128 + 384)  # 2 layers x c_attn (128 -> 384): A 8x128 + B 384x8
    assert params["trainable"] < 0.05 * params["total"]
    for name in ("ddp-2", "zero3-2"):
        ckpt = root / name / "checkpoints" / "step-20"
        adapter = ckpt / "trainable.safetensors"
        assert abs(adapter.stat().st_size / (params["trainable"] * 4) - 1) < 0.1
        assert not list((ckpt / "model").glob("*.safetensors"))  # no copy of the frozen base
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        assert size < 0.05 * params["total"] * 4 * 3  # far below weights + Adam moments of the whole model


def test_zero3_lora_matches_ddp_lora(runs):
    root, _, _ = runs
    ddp = losses(root / "ddp-2")
    assert np.mean(ddp[10:]) < np.mean(ddp[:10]) - 0.03  # the adapter learned something (batches differ: means)
    np.testing.assert_allclose(losses(root / "zero3-2"), ddp, rtol=0, atol=1e-4)


def test_sigterm_at_step_10_then_resume_is_exact(runs):
    root, stopped, resumed = runs
    assert "SIGTERM: saved a checkpoint at step 10" in stopped.err
    assert "resumed from" in resumed.out and "step-10" in resumed.out
    np.testing.assert_allclose(losses(root / "sigterm"), losses(root / "ddp-2"), rtol=0, atol=1e-6)
    a, b = weights(root / "sigterm" / "export" / "adapter"), weights(root / "ddp-2" / "export" / "adapter")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


@pytest.mark.extended
def test_resume_onto_another_world_size(runs, pydoc_blocks):
    root, _, _ = runs
    train(1, root / "zero3-1", pydoc_blocks, *LORA, *ONE, "--train.strategy=zero3",
          f"--run.resume={root / 'zero3-2' / 'checkpoints' / 'step-10'}")
    np.testing.assert_allclose(losses(root / "zero3-1", range(11, 21)), losses(root / "zero3-2", range(11, 21)),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["ddp-2", "zero3-2"])
def test_export_is_the_merged_model_and_the_adapter_loads_on_the_base(runs, name):
    from peft import PeftModel

    from distclm.model import build_model

    root, _, _ = runs
    export = root / name / "export"
    adapter = weights(export / "adapter")
    trainable = json.loads((root / name / "summary.json").read_text())["params"]["trainable"]
    assert abs((export / "adapter" / "adapter_model.safetensors").stat().st_size / (trainable * 4) - 1) < 0.1
    assert all(float(t.abs().max()) > 0 for k, t in adapter.items() if "lora_B" in k)  # every lora_B moved
    assert sum("lora_B" in k for k in adapter) == 2
    merged, base = weights(export), build_model("gpt2-tiny", 3).state_dict()  # the run's seed: its base model
    for key, tensor in merged.items():
        if "c_attn.weight" not in key:
            assert torch.equal(tensor, base[key]), key  # frozen: byte-identical to the start
    reference = PeftModel.from_pretrained(build_model("gpt2-tiny", 3), str(export / "adapter")).merge_and_unload()
    ref = reference.state_dict()
    assert max(float((merged[k] - ref[k]).abs().max()) for k in merged) < 1e-6
    assert any(not torch.equal(merged[k], base[k]) for k in merged if "c_attn.weight" in k)


def test_distclm_eval_on_the_merged_export_equals_the_in_run_eval(runs, cli, pydoc_blocks):
    root, _, _ = runs
    in_run = read_metrics(root / "zero3-2", "eval")[20]
    r = cli("eval", f"--model.name={root / 'zero3-2' / 'export'}", f"--data.dir={pydoc_blocks}",
            "--eval.max_blocks=32", "--eval.batch_size=16")
    ppl = float(r.out.split("perplexity: ")[1].split()[0])
    assert abs(ppl / in_run["eval_perplexity"] - 1) < 1e-5 and in_run["eval_perplexity"] < math.exp(10.8)


def test_offline_export_rebuilds_the_base_and_merges_the_checkpoint_adapter(runs, cli, tmp_path):
    root, _, _ = runs
    assert cli("export", root / "zero3-2", "--out", tmp_path / "hf").code == 0
    a, b = weights(tmp_path / "hf"), weights(root / "zero3-2" / "export")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


# CI: LoRA on gpt2-tiny (the fixture) and on a mixture of experts' attention; the rest in test_architectures.py
@pytest.mark.parametrize("preset", ["mixtral-tiny", *(pytest.param(p, marks=pytest.mark.extended) for p in
                                                      ("llama-tiny", "qwen2-tiny", "neox-tiny", "qwen2moe-tiny"))])
def test_lora_on_every_architecture_preset_with_zero2(tmp_path, pydoc_blocks, preset):
    from transformers import pipeline

    run = tmp_path / "run"
    named = ("--lora.target_modules=q_proj,v_proj",) if preset == "qwen2moe-tiny" else ()  # peft has no default
    train(2, run, pydoc_blocks, "--lora.r=4", "--train.max_steps=3", "--train.strategy=zero2", *TWO,
          "--eval.max_blocks=8", *named, model=preset)
    adapter = weights(run / "export" / "adapter")
    assert adapter and all(float(t.abs().max()) > 0 for t in adapter.values())
    assert all("self_attn" in k or "attention" in k or "attn" in k for k in adapter)  # peft's default: attention
    pipe = pipeline("text-generation", model=str(run / "export"), device="cpu")
    assert pipe("The with statement", max_new_tokens=3)[0]["generated_text"].startswith("The with statement")
