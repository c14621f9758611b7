"""`distclm eval` / `generate` on 1, 2 and 3 real processes (gloo, CPU), and eval during training.

One small prepared folder serves everything: the pydoc corpus's first 5 documents in 64-token blocks,
3 of them held out -> 50 train blocks and 31 validation blocks (31: divisible by neither 2 nor 3, so
every multi-process eval has uneven slices). One ZeRO-3 training run on 2 processes (8 steps) gives a
model that is not random and a run dir to evaluate; the reference perplexity is computed here with a
plain forward per block.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distclm.data.blocks import BlockReader
from tests.support.cli import command, run_cli
from tests.support.env import REPO, child_env
from tests.support.runs import read_metrics

N_VAL, BLOCK = 31, 64
TRAIN_ARGS = ("--train.strategy=zero3", "--train.micro_batch_size=4", "--train.max_steps=8", "--train.lr=1e-3",
              "--train.warmup_steps=2", "--eval.every_steps=5", "--eval.batch_size=3", "--log.every_steps=1")


def rel(a: float, b: float) -> float:
    return abs(a / b - 1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaldata")
    run_cli("prepare", *["--data.source=pydoc", f"--data.dir={out}", "--data.block_size=64",
                               "--data.max_docs=5", "--data.val_docs=3"], nproc=1, check=True)
    splits = json.loads((out / "manifest.json").read_text())["splits"]
    assert (splits["train"]["n_blocks"], splits["validation"]["n_blocks"]) == (50, N_VAL)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> tuple[Path, str]:
    """(run dir, console output) of 8 ZeRO-3 steps on 2 processes: global batch 8 -> 6 steps per epoch."""
    run_dir = tmp_path_factory.mktemp("evalrun") / "run"
    proc = run_cli("train", *[f"--data.dir={data}", "--model.name=gpt2-tiny", f"--run.dir={run_dir}",
                                    *TRAIN_ARGS], nproc=2, check=True)
    return run_dir, proc.out


@pytest.fixture(scope="module")
def reference(trained, data) -> dict:
    """Perplexity of the exported model the obvious way: one forward per block, NLL summed in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained[0] / "export").eval()
    reader = BlockReader(data)
    blocks = reader.split("validation")
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(blocks)):
            x = torch.from_numpy(blocks[i].astype(np.int64))[None]  # (1, T)
            logits = model(input_ids=x).logits[0, :-1].double()  # (T-1, V)
            nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            tokens += x.size(1) - 1
    reader.close()
    return {"loss": nll / tokens, "perplexity": math.exp(nll / tokens), "tokens": tokens, "model": model}


def hub_cache_with(model_dir: Path, root: Path, repo_id: str) -> Path:
    """An HF_HOME whose hub cache holds `model_dir` as `repo_id` (what `from_pretrained(repo_id)` left behind)."""
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def eval_json(nproc: int, args: list[str], out: Path, env: dict | None = None) -> tuple[dict, str]:
    cmd = command("eval", [*args, f"--eval.output={out}"], nproc)
    proc = subprocess.run(cmd, env=env or child_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout


# ---------------------------------------------------------------------------------------------
# During training (acceptance 3)


def test_training_evaluates_every_n_steps_and_at_each_epoch_end(trained):
    run_dir, console = trained
    evals = read_metrics(run_dir, "eval")
    # --eval.every_steps=5 -> 5; epoch end (6 steps per epoch) -> 6; the last step -> 8
    assert sorted(evals) == [5, 6, 8]
    assert [evals[s]["epoch"] for s in (5, 6, 8)] == [5 / 6, 1.0, 8 / 6]
    for step, rec in evals.items():
        assert set(rec) == {"type", "step", "epoch", "eval_loss", "eval_perplexity", "eval_tokens", "eval_blocks"}
        assert rec["eval_blocks"] == N_VAL
        assert rec["eval_tokens"] == N_VAL * (BLOCK - 1)
        assert rel(rec["eval_perplexity"], math.exp(rec["eval_loss"])) < 1e-12
        assert f"eval step {step}: loss {rec['eval_loss']:.4f} perplexity {rec['eval_perplexity']:.2f}" in console
    assert evals[8]["eval_loss"] < evals[5]["eval_loss"] < math.log(50257)  # it learned


def test_eval_during_zero3_training_equals_the_reference(trained, reference):
    """Uneven slices (15 / 16 blocks in batches of 3) under ZeRO-3: extra forwards, not counted."""
    last = read_metrics(trained[0], "eval")[8]
    assert rel(last["eval_perplexity"], reference["perplexity"]) < 1e-6


# ---------------------------------------------------------------------------------------------
# `distclm eval` (acceptance 1 and 2)


@pytest.mark.parametrize("nproc,batch,model,strategy", [
    (1, 8, "hub id", "ddp"), (2, 3, "run dir", "zero3"), pytest.param(3, 1, "export folder", "ddp", marks=pytest.mark.extended)])
def test_eval_is_the_same_on_1_2_3_processes(trained, data, reference, tmp_path, nproc, batch, model, strategy):
    """Uneven slices everywhere (31 blocks: 15/16 on 2 processes, 10/10/11 on 3); ZeRO-3 on 2 processes."""
    run_dir = trained[0]
    env = child_env()
    if model == "hub id":
        env["HF_HOME"] = str(hub_cache_with(run_dir / "export", tmp_path / "hf", "distclm-tests/tiny-trained"))
        env["HF_HUB_OFFLINE"] = "1"
        name = "distclm-tests/tiny-trained"
    else:
        name = str(run_dir if model == "run dir" else run_dir / "export")
    result, stdout = eval_json(nproc, [f"--model.name={name}", f"--data.dir={data}", "--eval.split=validation",
                                       f"--eval.batch_size={batch}", f"--train.strategy={strategy}"],
                               tmp_path / "result.json", env)
    assert set(result) == {"loss", "perplexity", "tokens", "blocks", "world_size"}
    assert (result["tokens"], result["blocks"], result["world_size"]) == (N_VAL * (BLOCK - 1), N_VAL, nproc)
    assert rel(result["perplexity"], reference["perplexity"]) < 1e-6
    assert rel(result["perplexity"], math.exp(result["loss"])) < 1e-12
    assert f"perplexity: {result['perplexity']:.6f}" in stdout.splitlines()
    if model == "run dir":
        assert f"eval: {run_dir / 'export'} on" in stdout  # RUN means RUN/export
    held = ("weights partitioned across processes (DeepSpeed ZeRO-3)" if strategy == "zero3"
            else "weights a full copy per process")
    assert held in stdout


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_batch_size_gives_the_reference(data, reference, world):
    """Batch sizes 1, 3 and 8 for each world size, ranks simulated in this process (their sums added up)."""
    from distclm.evaluation import local_sums

    reader = BlockReader(data)
    blocks = reader.split("validation")
    for batch in (1, 3, 8):
        sums = sum(local_sums(reference["model"], blocks, batch, "cpu", r, world) for r in range(world))
        assert int(sums[1]) == reference["tokens"]
        assert rel(math.exp(float(sums[0] / sums[1])), reference["perplexity"]) < 1e-6, (world, batch)
    reader.close()


# ---------------------------------------------------------------------------------------------
# `distclm generate` with ZeRO-3 on 2 ranks (acceptance 5)


def test_generate_under_zero3_on_two_ranks_is_partitioned_and_matches_one_process(trained, reference, tmp_path):
    """Both ranks hold half the weights and generate with synchronised forwards; rank 0 prints. Prompts of
    different lengths (left padding). The text equals a plain `generate` on the full model with the same seed."""
    from transformers import AutoTokenizer, set_seed

    prompts = ["The with statement", "Assignment statements are used to (re)bind names to values and to"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    proc = run_cli("generate", *[f"--model.name={trained[0]}", f"--prompt-file={tmp_path / 'prompts.txt'}",
                                       "--train.strategy=zero3", "--gen.max_new_tokens=16", "--gen.seed=5"], nproc=2, check=True, timeout=180)
    tok = AutoTokenizer.from_pretrained(trained[0] / "export")
    tok.padding_side, tok.pad_token = "left", tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)
    set_seed(5)
    with torch.no_grad():
        out = reference["model"].generate(**enc, max_new_tokens=16, do_sample=True, top_k=50, top_p=0.95,
                                          pad_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out, skip_special_tokens=True)
    assert proc.out.endswith("".join(f"{t}\n\n" for t in texts))
    assert all(t.startswith(p) for t, p in zip(texts, prompts))
