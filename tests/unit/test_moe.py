"""Mixture-of-experts models seen from their structure (distclm/moe.py): sparse blocks in both expert layouts,
ZeRO-3 leaves, active parameters in FLOPs per token, and the expert-load figures."""

from __future__ import annotations

import pytest
import torch

from distclm.errors import UserError
from distclm.loss import FusedOutput
from distclm.metrics import flops_per_token
from distclm.model import build_model, matmul_parameters, parameter_counts
from distclm.moe import RouterStats, inactive_parameters, load_figures, sparse_blocks, top_k, z3_leaves
from tests.support import toy_moe


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    toy_moe.save(folder)
    return build_model(str(folder), 0)


def test_sparse_blocks_in_both_layouts_and_none_in_dense_models(toy):
    for preset in ("mixtral-tiny", "qwen2moe-tiny"):  # transformers 5: each layer's experts one (E, ...) parameter
        blocks = sparse_blocks(build_model(preset, 0))
        assert [(b.name, b.n_experts, b.separate) for b in blocks] == \
            [("model.layers.0.mlp", 4, False), ("model.layers.1.mlp", 4, False)]
    assert [(b.name, b.n_experts, b.separate) for b in sparse_blocks(toy)] == [("blocks.0", 4, True), ("blocks.1", 4, True)]
    assert sparse_blocks(build_model("llama-tiny", 0)) == [] and sparse_blocks(build_model("gpt2-tiny", 0)) == []


def test_zero3_leaves_are_blocks_of_separate_experts_plus_named_classes(toy):
    assert [type(m).__name__ for m in z3_leaves(toy, "auto")] == ["ToySparseBlock", "ToySparseBlock"]
    assert z3_leaves(toy, "none") == [] and z3_leaves(build_model("mixtral-tiny", 0), "auto") == []  # fused: none needed
    named = z3_leaves(toy, "ToyExpert")
    assert len(named) == 8 and all(type(m).__name__ == "ToyExpert" for m in named)
    assert len(z3_leaves(toy, "auto,ToySparseBlock")) == 2  # once each
    with pytest.raises(UserError, match="--train.z3_leaf_modules: no module of class 'Nope'.*ToySparseBlock"):
        z3_leaves(toy, "auto,Nope")


def test_flops_count_the_active_experts_only():
    model = build_model("mixtral-tiny", 0)
    assert top_k(model.config) == 2 and top_k(build_model("llama-tiny", 0).config) is None
    # per layer: 4 experts x (gate_up 512x128 + down 128x256) = 393,216 expert weights; a token uses 2 of 4
    assert inactive_parameters(model, 2) == 2 * 393_216 // 2
    total = parameter_counts(model)[1]
    dense_like = flops_per_token(matmul_parameters(model), 2, 128, 64)
    active = flops_per_token(matmul_parameters(model) - 393_216, 2, 128, 64)
    assert dense_like - active == 6 * 393_216  # 6 FLOPs (forward 2 + backward 4) per inactive weight
    assert total - inactive_parameters(model, 2) == 13_358_976


def test_expert_load_balanced_against_collapsed():
    g = torch.Generator().manual_seed(0)
    balanced = RouterStats(k=2)
    balanced.add(FusedOutput({"aux_loss": torch.tensor(1.0), "router_logits": (torch.randn(4000, 4, generator=g),) * 2}))
    figures = balanced.figures(balanced.payload(log_step=True, device="cpu"), world=1)
    assert figures["aux_loss"] == 1.0 and figures["experts"]["idle"] == 0
    assert abs(figures["experts"]["max_share"] - 0.25) < 0.02  # 2 slots per token over 4 experts: 1/4 each
    collapsed = RouterStats(k=1)
    logits = torch.randn(4000, 4, generator=g) + torch.tensor([9.0, 0, 0, 0])
    collapsed.add(FusedOutput({"aux_loss": torch.tensor(4.0), "router_logits": (logits, torch.randn(4000, 4, generator=g))}))
    figures = collapsed.figures(collapsed.payload(log_step=True, device="cpu"), world=1)
    assert figures["experts"]["max_share"] > 0.99 and figures["experts"]["idle"] == 3  # layer 0: experts 1-3 idle
    assert load_figures(torch.tensor([[3.0, 1.0], [0.0, 4.0]])) == {"max_share": 1.0, "idle": 1}


def test_expert_counts_ride_on_log_steps_only_and_reset():
    stats = RouterStats(k=1)
    out = FusedOutput(aux_loss=torch.tensor(2.0), router_logits=(torch.tensor([[1.0, 0.0], [0.0, 1.0]]),))
    stats.add(out)
    assert stats.payload(log_step=False, device="cpu").tolist() == [2.0]  # the step's aux only: counts carry on
    stats.add(out)
    assert stats.payload(log_step=True, device="cpu").tolist() == [2.0, 2.0, 2.0]  # aux; 2 steps x 1 token each
    assert stats.payload(log_step=True, device="cpu") is None  # nothing since
    assert RouterStats(k=2).payload(True, "cpu") is None  # a dense model: nothing added to the all-reduce
