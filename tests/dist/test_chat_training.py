"""Chat fine-tuning's exact loss: the same per-step losses on any micro-batch / accumulation / world-size layout
of one global batch, pinned to a bare computation of sum(label NLL) / labels at the initial weights.

The folder is the shipped chat corpus in 64-token blocks: answers of one to eight sentences, many truncated, so
the labels per block range widely (the mean of per-micro-batch means is measurably another number).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distclm.data.blocks import BlockReader
from distclm.data.loader import BlockSampler
from tests.support.cli import run_cli
from tests.support.runs import read_metrics, train

STEPS, SEED = 3, 3
ARGS = (f"--train.max_steps={STEPS}", "--train.lr=1e-3", f"--train.seed={SEED}", "--eval.max_blocks=4",
        "--train.micro_batch_size=2")


@pytest.fixture(scope="module")
def chat_blocks(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat64")
    run_cli("prepare", "--data.source=pydoc-chat", f"--data.dir={out}", "--data.block_size=64",
            "--data.val_fraction=0.1", check=True)
    return out


def step_losses(run_dir) -> list[float]:
    recs = read_metrics(run_dir)
    assert sorted(recs) == list(range(1, STEPS + 1))
    return [recs[s]["loss"] for s in range(1, STEPS + 1)]


def reference_losses(data, micro=2, accum=4, lr=1e-3, wd=0.01, clip=1.0) -> tuple[list[float], list[float]]:
    """A bare loop on one process: each step's loss = sum of label NLL over its global batch / its labels, the
    gradient of exactly that (AdamW groups and linear schedule as distclm's). -> (step losses, each step's mean
    of the micro-batch means: the old reduction, at the same weights)."""
    from distclm.loss import masked_nll_sum
    from distclm.model import build_model

    blocks = BlockReader(data).split("train")
    sampler = BlockSampler(len(blocks), micro, accum, 1, SEED)
    torch.manual_seed(SEED)
    model = build_model("gpt2-tiny", SEED)
    model.train()
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": wd},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / STEPS))
    losses, mean_of_means = [], []
    for step in range(STEPS):
        ids = sampler.global_indices(step).reshape(accum, micro)
        flags = [torch.from_numpy(blocks.flags(m)) for m in ids]
        counts = [int(((f[:, 1:] & 1) != 0).sum()) for f in flags]
        n, total, means = sum(counts), 0.0, []
        for m, f, c in zip(ids, flags, counts):
            nll = masked_nll_sum(model, torch.from_numpy(blocks.batch(m).astype(np.int64)), f)
            (nll / n).backward()
            total, means = total + float(nll.detach()), means + [float(nll.detach()) / c]
        assert len(set(counts)) > 1, counts  # the micro-batches hold different numbers of labels
        mean_of_means.append(float(np.mean(means)))
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total / n)
    return losses, mean_of_means


@pytest.fixture(scope="module")
def two_procs_run(chat_blocks, tmp_path_factory):
    run = tmp_path_factory.mktemp("chat-two")
    train(2, run, chat_blocks, *ARGS, "--train.grad_accum=2")
    return run


@pytest.fixture(scope="module")
def two_procs(two_procs_run):
    return step_losses(two_procs_run)


def test_eval_counts_only_labels_and_the_export_speaks_the_data_template(chat_blocks, two_procs_run):
    from transformers import AutoTokenizer

    from distclm.loss import label_count

    val = BlockReader(chat_blocks).split("validation")
    labels = label_count(val.flags(range(4)))  # --eval.max_blocks=4
    ev = read_metrics(two_procs_run, "eval")[STEPS]
    print(f"eval over {ev['eval_tokens']} labels of {4 * 63} predicted positions: loss {ev['eval_loss']:.4f}")
    assert ev["eval_tokens"] == labels < 4 * 63
    manifest = json.loads((chat_blocks / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(two_procs_run / "export")
    assert tok.chat_template == manifest["chat_template"]
    messages = [{"role": "user", "content": "What is a list?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nWhat is a list?<|endoftext|><|im_start|>assistant\n"


def test_exact_loss_on_two_processes_matches_the_bare_loop(chat_blocks, two_procs):
    ref, mean_of_means = reference_losses(chat_blocks)
    differ = max(abs(a - b) for a, b in zip(mean_of_means, ref))
    print(f"2 procs accum 2: {two_procs}\nbare loop (1 proc accum 4): {ref}\nmean of micro means: {mean_of_means} "
          f"(differs by up to {differ:.2e})")
    np.testing.assert_allclose(two_procs, ref, rtol=0, atol=1e-5)
    assert differ > 2e-4  # the old reduction is another number on this folder: 20x the tolerance above
    assert ref[-1] < ref[0] - 0.05  # the weights moved: later steps compare trained models


@pytest.mark.extended
@pytest.mark.parametrize("nproc, accum, strategy", [(1, 4, "ddp"), (4, 1, "ddp"), (2, 2, "zero2")])
def test_exact_loss_on_one_and_four_processes_and_under_zero(chat_blocks, two_procs, tmp_path, nproc, accum, strategy):
    """DeepSpeed divides each backward by its accumulation steps itself (scale_wrt_gas): the same losses."""
    train(nproc, tmp_path / "run", chat_blocks, *ARGS, f"--train.grad_accum={accum}", f"--train.strategy={strategy}")
    np.testing.assert_allclose(step_losses(tmp_path / "run"), two_procs, rtol=0, atol=1e-5)
