"""Per-step losses of distclm against a plain PyTorch loop, across world sizes and ZeRO stages (fp32, CPU, gloo).

The world-size and ZeRO-stage comparisons run a GPT-2 with dropout 0.1 and attention within documents
(tests/support/runs.py PARITY): dropout's random stream follows the data's place in the global batch, not the
rank, so 1 process with accumulation and 2 processes draw the same masks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distclm.data.blocks import BlockReader
from distclm.model import build_model
from tests.support.runs import read_metrics

STEPS = 6  # the "equiv-*" shared runs (tests/support/runs.py): 6 steps, global batch 8 blocks of 64 tokens


def losses(run_dir) -> list[float]:
    recs = read_metrics(run_dir)
    assert sorted(recs) == list(range(1, STEPS + 1))
    return [recs[s]["loss"] for s in range(1, STEPS + 1)]


def plain_pytorch_losses(data_dir, seed=3, micro=8, steps=STEPS, lr=1e-3, warmup=2, wd=0.01, clip=1.0):
    """The reference: a bare loop with the documented data order, AdamW groups and linear schedule."""
    reader = BlockReader(data_dir)
    blocks = reader.split("train")
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = build_model("gpt2-tiny", seed)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warmup if s < warmup else max(0.0, 1 - (s - warmup) / max(1, steps - warmup)))
    perm = np.random.default_rng([seed, 0]).permutation(len(blocks))
    out = []
    for step in range(steps):
        ids = perm[step * micro:(step + 1) * micro]
        x = torch.from_numpy(blocks.batch(ids).astype(np.int64))
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def test_one_process_matches_plain_pytorch_loop(shared, pydoc_blocks):
    ours = losses(shared.get("equiv-1proc"))
    ref = plain_pytorch_losses(pydoc_blocks)
    assert ours[0] > 10.0  # a random-init GPT-2 over 50257 tokens starts near ln(50257) = 10.8
    assert ours[-1] < ours[0] - 0.2  # it learned: the comparison is not between two flat lines
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_two_process_ddp_matches_one_process_with_accumulation(shared, dropout_gpt2):
    import json

    import yaml

    assert json.loads((dropout_gpt2 / "config.json").read_text())["resid_pdrop"] == 0.1  # dropout really on
    run = shared.get("equiv-ddp-2proc")
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["doc_attention"] == "within"
    one = losses(shared.get("equiv-1proc-accum2"))
    two = losses(run)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)


@pytest.mark.parametrize("strategy", [pytest.param("zero1", marks=pytest.mark.extended), "zero2", "zero3"])
def test_zero_stages_match_ddp(shared, strategy):
    ddp = losses(shared.get("equiv-ddp-2proc"))
    zero = losses(shared.get(f"equiv-{strategy}-2proc"))
    np.testing.assert_allclose(zero, ddp, rtol=0, atol=1e-4)
    assert (shared.get(f"equiv-{strategy}-2proc") / "ds_config.json").exists()


@pytest.mark.extended  # CPU Adam is JIT-built on first use (~2 min on 2 cores)
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_with_optimizer_offload_matches_ddp(shared, strategy):
    ddp = losses(shared.get("equiv-ddp-2proc"))
    off = losses(shared.get(f"equiv-{strategy}-offload-2proc"))
    assert all(math.isfinite(v) for v in off)
    np.testing.assert_allclose(off, ddp, rtol=0, atol=1e-3)


@pytest.mark.extended
def test_activation_checkpointing_gives_the_same_losses(shared):
    plain = losses(shared.get("equiv-1proc"))
    recomputed = losses(shared.get("equiv-1proc-act-ckpt"))
    np.testing.assert_allclose(recomputed, plain, rtol=0, atol=1e-5)


@pytest.mark.extended  # inductor compiles C++ on the CPU: ~100 s
def test_torch_compile_trains_the_same_and_exports_plain_weight_names(shared):
    from safetensors.numpy import load_file

    plain_dir = shared.get("equiv-1proc")
    compiled_dir = shared.get("equiv-1proc-compile")
    np.testing.assert_allclose(losses(compiled_dir), losses(plain_dir), rtol=0, atol=1e-4)
    a = load_file(str(compiled_dir / "export" / "model.safetensors"))
    b = load_file(str(plain_dir / "export" / "model.safetensors"))
    assert sorted(a) == sorted(b)  # no "_orig_mod." prefix: the folder loads as a Hugging Face model
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-3
