"""Pure pieces of training: the sampler's order, the lr schedule, AdamW groups, FLOPs/MFU, the DeepSpeed config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distclm.config import build_config
from distclm.data.loader import BlockSampler
from distclm.ds_config import resolve
from distclm.errors import UserError
from distclm.metrics import ThroughputMeter, flops_per_token, mfu, peak_tflops_for
from distclm.optim import lr_lambda, param_groups


def resolve_ds_config(cfg, world, hidden_size):
    return resolve(cfg.train, world, hidden_size, precision="no")


def test_sampler_epoch_is_a_permutation_cut_into_global_batches():
    s = BlockSampler(n_blocks=103, micro=4, accum=2, world=3, seed=7)
    assert s.global_batch == 24 and s.steps_per_epoch == 4  # 103 // 24; 7 blocks dropped
    seen = np.concatenate([s.rank_indices(step, r).reshape(-1) for step in range(4) for r in range(3)])
    assert len(seen) == 96 and len(set(seen.tolist())) == 96  # no block twice in an epoch
    assert 103 - len(seen) < s.global_batch  # fewer than one global batch left out
    # The next epoch is another order, and drops other blocks.
    e1 = set(np.concatenate([s.global_indices(step) for step in range(4, 8)]).tolist())
    assert e1 != set(seen.tolist())


def test_sampler_rank_split_does_not_depend_on_world_size_for_the_same_global_batch():
    one = BlockSampler(500, micro=4, accum=2, world=1, seed=1)
    two = BlockSampler(500, micro=4, accum=1, world=2, seed=1)
    for step in (0, 5, 62, 63, 130):  # across epoch boundaries (62 steps per epoch)
        np.testing.assert_array_equal(one.global_indices(step), two.global_indices(step))
        # [accum][world][micro]: rank r of 2 gets what micro-batch r of 1 process gets.
        np.testing.assert_array_equal(two.rank_indices(step, 1)[0], one.rank_indices(step, 0)[1])


def test_sampler_resume_is_o1_and_position_exact():
    s = BlockSampler(10_000, micro=8, accum=1, world=2, seed=0)
    fresh = BlockSampler(10_000, micro=8, accum=1, world=2, seed=0)
    pos = s.position(1_234)
    assert (pos.epoch, pos.step_in_epoch) == (1_234 // 625, 1_234 % 625)
    np.testing.assert_array_equal(s.global_indices(1_234), fresh.global_indices(1_234))


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule_warmup_then_decay(schedule):
    f = lr_lambda(schedule, warmup=10, total=110)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0
    end = {"linear": 0.0, "cosine": 0.0, "constant": 1.0}[schedule]
    assert f(110) == pytest.approx(end, abs=1e-12)
    mid = {"linear": 0.5, "cosine": 0.5, "constant": 1.0}[schedule]
    assert f(60) == pytest.approx(mid)


def test_linear_schedule_matches_transformers():
    from transformers import get_linear_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    hf = get_linear_schedule_with_warmup(opt, 7, 50)
    ours = lr_lambda("linear", 7, 50)
    for step in range(50):
        assert ours(step) == pytest.approx(hf.get_last_lr()[0], abs=1e-12)
        opt.step()
        hf.step()


def test_no_weight_decay_on_biases_and_layernorm():
    from distclm.model import build_model

    model = build_model("gpt2-tiny", 0)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(".bias") or ".ln_" in names[id(p)] for p in no_decay["params"])
    assert any(".ln_1.weight" in names[id(p)] for p in no_decay["params"])
    assert not any(names[id(p)].endswith(".bias") for p in decay["params"])


def test_flops_and_mfu_on_a_synthetic_case():
    # N = 1e9 matmul parameters, 24 layers of 16 heads x 128 at seq 1024:
    fpt = flops_per_token(1_000_000_000, n_layers=24, attn_width=16 * 128, seq_len=1024)
    assert fpt == 6e9 + 12 * 24 * 2048 * 1024
    # 10k tokens/s on 8 devices of 100 TFLOP/s peak:
    assert mfu(10_000, fpt, 100.0, 8) == pytest.approx(10_000 * fpt / 8e14)
    assert mfu(10_000, fpt, None, 8) is None  # CPU: unknown peak -> n/a


@pytest.mark.parametrize("preset, lookups", [
    ("gpt2-tiny", ["transformer.wpe.weight"]),           # wte is tied to the LM head: a matmul, it stays in
    ("llama-tiny", ["model.embed_tokens.weight"]),       # untied: the input embedding is a lookup only
    ("neox-tiny", ["gpt_neox.embed_in.weight"]),
    ("qwen2-tiny", []),                                  # tied, rotary (no position embedding)
])
def test_matmul_parameters_leave_out_embedding_lookups_only(preset, lookups):
    from distclm.model import ModelShape, build_model, matmul_parameters, parameter_counts

    model = build_model(preset, 0)
    sizes = dict(model.named_parameters())
    assert matmul_parameters(model) == parameter_counts(model)[1] - sum(sizes[n].numel() for n in lookups)
    shape = ModelShape.of(model.config)
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.head_dim, shape.max_positions,
            shape.vocab_size) == (128, 2, 4, 32, 1024, 50257)


def test_throughput_meter_reports_the_mfu_it_should():
    fpt = 1e9
    meter = ThroughputMeter(flops_per_token=fpt, n_devices=2, peak_tflops=1.0)
    for i in range(6):  # 1000 tokens per step, one step per 0.5 s: 2000 tokens/s
        meter.update(1000, now=10.0 + 0.5 * i)
    assert meter.tokens_per_s == pytest.approx(2000.0)
    assert meter.mfu == pytest.approx(2000 * 1e9 / 2e12)  # = 1.0: the peak of 2 devices


def test_peak_table_and_override():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for(None) is None
    assert peak_tflops_for(None, 42.0) == 42.0


def test_ds_config_has_no_auto_left_and_follows_the_flags():
    cfg = build_config(flags={"train.strategy": "zero3", "train.micro_batch_size": "4", "train.grad_accum": "3",
                              "train.max_grad_norm": "0.5", "train.offload": "optimizer"})
    ds = resolve_ds_config(cfg, world=2, hidden_size=128)
    assert "auto" not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["reduce_bucket_size"] == 128 * 128


def test_user_ds_config_that_contradicts_the_batch_is_refused(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"overlap_comm": True}}))
    cfg = build_config(flags={"train.strategy": "zero2", "train.deepspeed_config": str(user)})
    with pytest.raises(UserError, match="train_batch_size=64 contradicts"):
        resolve_ds_config(cfg, world=2, hidden_size=128)
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "stage": 2}}))
    ds = resolve_ds_config(cfg, world=2, hidden_size=128)
    assert ds["zero_optimization"]["overlap_comm"] is True  # user settings are kept under ours
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(UserError, match="contradicts --train.strategy=zero2"):
        resolve_ds_config(cfg, world=2, hidden_size=128)


def test_offload_all_needs_zero3():
    cfg = build_config(flags={"train.strategy": "zero2", "train.offload": "all"})
    with pytest.raises(UserError, match="needs --train.strategy=zero3"):
        resolve_ds_config(cfg, world=1, hidden_size=128)


def test_math_of_the_schedule_is_not_nan():
    assert not math.isnan(lr_lambda("cosine", 0, 1)(0))
