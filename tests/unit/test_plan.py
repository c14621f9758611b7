"""distclm.plan: memory parts follow their formulas per strategy, the recommendation is the fastest that fits,
nothing-fits says what would, and plans for big worlds (7B Llama, Mixtral at 64/512/4096 ranks) are finite."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from distclm import plan as pm
from distclm.config import Config
from distclm.plan_cli import make_plan, parse_size, recommend
from distclm.plan_report import nothing_fits, render

GB = 10**9
H100 = pm.Device(80 * GB, 400.0, 400.0, 1 << 30, False)


def llama7b():
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                max_position_embeddings=4096, tie_word_embeddings=False)


def mixtral():
    from transformers import AutoConfig

    return AutoConfig.for_model("mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768)


@pytest.fixture(scope="module")
def tiny():
    from distclm.model import preset_config

    return pm.arch_of(preset_config("llama-tiny"))


def setup(**kw) -> pm.Setup:
    base = dict(strategy="ddp", offload="none", micro_batch_size=4, grad_accum=1, activation_checkpointing=False,
                world=4, block_size=128, half=False, fused_loss=True)
    return pm.Setup(**{**base, **kw})


def cfg_for(name: str, world: int, **train) -> Config:
    cfg = Config()
    cfg.model.name, cfg.plan.world, cfg.data.block_size = name, world, 128
    cfg.train = dataclasses.replace(cfg.train, **train)
    return cfg


def test_parameters_are_counted_from_the_architecture():
    a = pm.arch_of(llama7b())
    assert a.total == a.trainable == 6_738_415_616  # Llama-2-7B's published count
    # active = all but the input embedding lookup (32000 x 4096)
    assert a.matmul_active == a.total - 32000 * 4096
    m = pm.arch_of(mixtral())
    experts = 32 * 8 * 3 * 4096 * 14336
    assert 46.6e9 < m.total < 46.8e9
    assert m.matmul_active == m.total - 32000 * 4096 - experts * 6 // 8  # 2 of 8 experts per token
    assert m.ffn == 2 * 14336 and m.gated and m.kv_dim == 8 * 128


def test_model_states_partition_as_each_strategy_says(tiny):
    P = T = tiny.total
    ddp = pm.model_state_parts(tiny, setup(), None)
    assert ddp["weights"] == P * 4 and ddp["gradients"] == T * 4 and ddp["optimizer states"] == T * 8
    assert ddp["ddp buckets"] == T * 4 and ddp["master weights"] == 0
    z1 = pm.model_state_parts(tiny, setup(strategy="zero1"), {})
    assert z1["optimizer states"] == T * 8 // 4 and z1["weights"] == P * 4
    z2 = pm.model_state_parts(tiny, setup(strategy="zero2"), {"zero_optimization": {"reduce_bucket_size": 1000}})
    assert z2["gradient partition"] == T * 4 // 4 and z2["zero buffers"] == 4000 and z2["gradients"] == 0
    assert z1["gradients"] == T * 4  # stage 1 keeps every gradient until the step
    z3 = pm.model_state_parts(tiny, setup(strategy="zero3"), {"zero_optimization": {
        "reduce_bucket_size": 10, "stage3_max_live_parameters": 100, "stage3_prefetch_bucket_size": 10}})
    V, h = tiny.shape.vocab_size, tiny.shape.hidden_size
    assert z3["weights"] == P * 4 // 4 and z3["gradient partition"] == T * 4 // 4 and z3["gradients"] == V * h * 4
    assert pm.model_state_parts(tiny, setup(strategy="zero2"), {}, host=True)["gradients"] == T * 4
    assert z3["zero buffers"] == 40 + (110 + tiny.shape.vocab_size * tiny.shape.hidden_size) * 4
    z3_8 = pm.model_state_parts(tiny, setup(strategy="zero3", world=8), {})
    assert z3_8["weights"] == pytest.approx(z3["weights"] / 2, abs=1)
    bf16 = pm.model_state_parts(tiny, setup(strategy="zero2", half=True), {})
    assert bf16["weights"] == P * 2 and bf16["master weights"] == T * 4 // 4


def test_offload_moves_optimizer_and_weights_to_the_host(tiny):
    off = pm.model_state_parts(tiny, setup(strategy="zero3", offload="all"), {})
    assert "optimizer states" not in off and "weights" not in off
    assert off["host: optimizer states"] == tiny.trainable * 8 // 4 and off["host: weights"] == tiny.total
    gpu, cpu = dataclasses.replace(H100, is_host=False), dataclasses.replace(H100, is_host=True)
    assert pm.per_rank_peak(off, cpu) - pm.per_rank_peak(off, gpu) == sum(v for k, v in off.items() if "host" in k)


def test_activations_scale_with_micro_checkpointing_and_the_output_layer(tiny):
    a1, a2 = pm.activation_parts(tiny, setup(micro_batch_size=1)), pm.activation_parts(tiny, setup(micro_batch_size=2))
    assert a2["activations"] == 2 * a1["activations"]
    ck = pm.activation_parts(tiny, setup(activation_checkpointing=True))
    assert ck["activations"] < pm.activation_parts(tiny, setup())["activations"]
    plain = pm.activation_parts(tiny, setup(fused_loss=False))["output layer"]
    assert plain == 4 * 4 * 128 * tiny.shape.vocab_size * 4  # logits, log-softmax, two gradients; fp32
    from distclm.loss import chunk_tokens

    fused = pm.activation_parts(tiny, setup())["output layer"]
    assert fused == chunk_tokens(tiny.shape.vocab_size) * tiny.shape.vocab_size * 4 + 4 * 128 * tiny.shape.hidden_size * 4


def test_communication_per_strategy_follows_the_ring_formulas(tiny):
    dev = dataclasses.replace(H100, bandwidth_gbps=8.0)  # 1 GB/s: comm_s = bytes / 1e9
    r, T = 3 / 4, tiny.total
    assert pm.step_time(tiny, setup(), dev)["comm_s"] == pytest.approx(2 * r * T * 4 / 1e9)
    z3 = pm.step_time(tiny, setup(strategy="zero3", grad_accum=2), dev)["comm_s"]
    assert z3 == pytest.approx((2 * r * T * 4 + r * T * 4) * 2 / 1e9)
    assert pm.step_time(tiny, setup(world=1), dev)["comm_s"] == 0


def test_recommendation_is_the_fastest_that_fits_and_the_simplest_among_ties():
    row = dict(offload="none", activation_checkpointing=False, micro_batch_size=8)
    configs = [dict(row, strategy="ddp", step_time_s=1.0, fits=False),
               dict(row, strategy="zero3", step_time_s=1.5, fits=True),
               dict(row, strategy="zero2", step_time_s=1.51, fits=True),
               dict(row, strategy="zero1", step_time_s=2.0, fits=True)]
    assert recommend(configs) == 2  # zero2 is within 2% of zero3 and simpler
    configs[2]["step_time_s"] = 1.6
    assert recommend(configs) == 1
    assert recommend([dict(c, fits=False) for c in configs]) is None


@pytest.mark.parametrize("model", ["llama7b", "mixtral"])
def test_big_worlds_give_finite_plans_and_communication_grows_with_zero3(model):
    arch = pm.arch_of({"llama7b": llama7b, "mixtral": mixtral}[model]())
    comm_share = {}
    for world in (64, 512, 4096):
        plan = make_plan(cfg_for(model, world, micro_batch_size=1, global_batch_size=world * 4), world, H100, arch)
        for c in plan["configs"]:
            assert math.isfinite(c["step_time_s"]) and c["step_time_s"] > 0 and c["per_rank_peak_bytes"] > 0
        z3 = [c for c in plan["configs"] if c["strategy"] == "zero3" and c["offload"] == "none"][0]
        comm_share[world] = z3["comm_s"] / z3["step_time_s"]
        assert plan["recommended"] is not None  # 80 GB ranks hold either model under ZeRO-3 at these worlds
        assert "recommended:" in render(plan)
    assert comm_share[64] < comm_share[4096]


def test_the_json_has_the_contract_keys():
    from distclm.model import preset_config

    arch = pm.arch_of(preset_config("gpt2-tiny"))
    plan = json.loads(json.dumps(make_plan(cfg_for("gpt2-tiny", 2), 2, H100, arch)))
    assert set(plan) == {"given", "configs", "recommended"}
    keys = {"strategy", "offload", "micro_batch_size", "activation_checkpointing", "per_rank_peak_bytes", "parts",
            "step_time_s", "fits"}
    assert keys <= set(plan["given"]) and all(keys <= set(c) for c in plan["configs"])
    times = [c["step_time_s"] for c in plan["configs"]]
    assert times == sorted(times)
    assert isinstance(plan["recommended"], int) and plan["configs"][plan["recommended"]]["fits"]
    assert all(sum(c["parts"].values()) >= c["per_rank_peak_bytes"] for c in plan["configs"])


def test_nothing_fits_says_so_and_what_would():
    from distclm.model import preset_config

    arch = pm.arch_of(preset_config("distilgpt2-arch"))
    small = dataclasses.replace(H100, memory_bytes=int(1.2 * GB), baseline_bytes=int(0.3 * GB), is_host=True)
    cfg = cfg_for("distilgpt2-arch", 1, micro_batch_size=8)
    plan = make_plan(cfg, 1, small, arch)
    assert plan["recommended"] is None and not any(c["fits"] for c in plan["configs"])
    text = nothing_fits(cfg, plan)
    assert text.startswith("NOTHING FITS in 1.20 GB")
    # zero3 shards the model states over more ranks; LoRA drops the gradients and Adam states of the base model;
    # a smaller block only shrinks activations, which checkpointing at micro 1 already made small
    assert re.search(r"\n  - \d+ ranks: zero3", text), text
    assert re.search(r"\n  - LoRA --lora.r=8: \w+", text) and "--data.block_size=64: still not" in text


def test_sizes_parse_and_bad_ones_name_the_flag():
    from distclm.errors import UserError

    assert parse_size("80GB", "f") == 80 * GB and parse_size("141GiB", "f") == 141 * 2**30
    assert parse_size("1.5e9", "f") == 1_500_000_000 and parse_size("512 MB", "f") == 512 * 10**6
    for bad in ("lots", "-3GB", "0", "80XB"):
        with pytest.raises(UserError, match="--plan.device_memory: expected a positive size"):
            parse_size(bad, "--plan.device_memory")
