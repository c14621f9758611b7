"""Any causal LM, not only GPT-2: the Llama, Qwen2, GPT-NeoX and mixture-of-experts (Mixtral, Qwen2-MoE) presets
(random init from config, GPT-2 vocabulary) train, resume, evaluate, export and generate, and ZeRO-3 on 2 processes
equals DDP on 1.

Per preset, three real runs on the pydoc blocks (64 tokens, global batch 8, 10 steps, lr 1e-3):
  ddp-1     1 process, DDP, micro 8
  zero3-2   2 processes, ZeRO-3, micro 4, a checkpoint at step 5 and 10
  zero3-1   1 process, ZeRO-3, micro 8, resumed from zero3-2's step-5 (the universal checkpoint path)
A mixture of experts' balancing loss is a function of each micro-batch's routing (of the tokens routed together),
so its 1-process runs take micro 4 x accumulation 2: the same micro-batches as on 2 processes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from distclm.model import preset_config
from tests.support.runs import read_metrics, train

STEPS = 10
COMMON = (f"--train.max_steps={STEPS}", "--train.lr=1e-3", "--train.warmup_steps=2", "--train.seed=3",
          "--eval.batch_size=16", "--eval.max_blocks=32")


MOE = ("mixtral-tiny", "qwen2moe-tiny")


@pytest.fixture(scope="module", params=["llama-tiny", "mixtral-tiny", pytest.param("qwen2-tiny", marks=pytest.mark.extended),
                                        pytest.param("neox-tiny", marks=pytest.mark.extended),
                                        pytest.param("qwen2moe-tiny", marks=pytest.mark.extended)])
def runs(request, tmp_path_factory, pydoc_blocks):
    preset, root = request.param, tmp_path_factory.mktemp(request.param)
    one = ("--train.micro_batch_size=4", "--train.grad_accum=2") if preset in MOE else ("--train.micro_batch_size=8",)
    train(1, root / "ddp-1", pydoc_blocks, *COMMON, *one, model=preset)
    train(2, root / "zero3-2", pydoc_blocks, *COMMON, "--train.micro_batch_size=4", "--train.strategy=zero3",
          "--train.save_every=5", model=preset)
    resumed = train(1, root / "zero3-1", pydoc_blocks, *COMMON, *one,
                    "--train.strategy=zero3", f"--run.resume={root / 'zero3-2' / 'checkpoints' / 'step-5'}",
                    model=preset)
    return preset, root, resumed.out


def losses(run_dir, steps=range(1, STEPS + 1)) -> list[float]:
    recs = read_metrics(run_dir)
    return [recs[s]["loss"] for s in steps]


def test_zero3_on_two_processes_equals_ddp_on_one(runs):
    preset, root, _ = runs
    ddp, zero3 = losses(root / "ddp-1"), losses(root / "zero3-2")
    assert ddp[0] > 10.0 and ddp[-1] < ddp[0] - 0.5  # it learned: not two flat lines
    np.testing.assert_allclose(zero3, ddp, rtol=0, atol=1e-4)
    if preset in MOE:  # the routers' balancing loss is in the objective, and the load of every expert is shown
        recs = read_metrics(root / "zero3-2")
        assert all(1.0 < recs[s]["aux_loss"] < 4.0 and 0.25 <= recs[s]["experts"]["max_share"] <= 0.5 for s in recs)
        np.testing.assert_allclose([recs[s]["aux_loss"] for s in recs],
                                   [read_metrics(root / "ddp-1")[s]["aux_loss"] for s in recs], rtol=0, atol=1e-4)


def test_a_two_process_checkpoint_resumes_on_one_process(runs):
    preset, root, console = runs
    assert "resumed from" in console and "written by 2 process(es), now 1" in console
    np.testing.assert_allclose(losses(root / "zero3-1", range(6, STEPS + 1)),
                               losses(root / "zero3-2", range(6, STEPS + 1)), rtol=0, atol=1e-5)


def test_export_loads_with_pipeline_and_generates(runs):
    from transformers import pipeline

    preset, root, _ = runs
    pipe = pipeline("text-generation", model=str(root / "zero3-2" / "export"), device="cpu")
    assert pipe.model.config.model_type == preset_config(preset).model_type
    text = pipe("The with statement", max_new_tokens=5)[0]["generated_text"]
    assert text.startswith("The with statement") and len(text) > len("The with statement")


def test_distclm_eval_on_the_export_equals_the_in_run_eval(runs, cli, pydoc_blocks):
    preset, root, _ = runs
    in_run = read_metrics(root / "zero3-2", "eval")[STEPS]
    r = cli("eval", f"--model.name={root / 'zero3-2' / 'export'}", f"--data.dir={pydoc_blocks}",
            "--eval.batch_size=16", "--eval.max_blocks=32")
    assert r.code == 0, r.err
    ppl = float(r.out.split("perplexity: ")[1].split()[0])
    assert abs(ppl / in_run["eval_perplexity"] - 1) < 1e-6
    assert in_run["eval_perplexity"] < math.exp(losses(root / "ddp-1")[0])  # the eval saw a trained model
