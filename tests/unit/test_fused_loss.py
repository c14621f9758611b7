"""The fused linear + cross-entropy equals the model's own loss, its gradients, and the eval sums, on every preset
(tied and untied output embeddings, mixtures of experts with their router's balancing loss), with LoRA's frozen
output layer, and with attention within documents."""

from __future__ import annotations

import copy

import pytest
import torch

from distclm.loss import ChunkedLinearCrossEntropy, chunk_tokens, install, is_fused, mean_loss, nll_sum, objective
from distclm.model import build_model

MOE = ["mixtral-tiny", "qwen2moe-tiny"]
PRESETS = ["gpt2-tiny", "llama-tiny", "qwen2-tiny", "neox-tiny", *MOE]


def batch(seed: int = 0, b: int = 3, t: int = 40) -> torch.Tensor:
    x = torch.randint(0, 50256, (b, t), generator=torch.Generator().manual_seed(seed))
    x[:, 17] = 50256  # an EOS mid-block: a second document
    return x


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("eos", [None, 50256], ids=["cross", "within"])
def test_loss_and_gradients_equal_the_models_own(preset, eos):
    own = build_model(preset, 0)
    fused = copy.deepcopy(own)
    assert "fused" in install(fused, True) and is_fused(fused) and not is_fused(own)
    x = batch()
    a, b = mean_loss(own, x, eos), mean_loss(fused, x, eos)
    a.backward()
    b.backward()
    assert abs(a.item() - b.item()) < 1e-5
    head_own, head_fused = own.get_output_embeddings().weight, fused.get_output_embeddings().weight
    assert (head_own.grad - head_fused.grad).abs().max() < 1e-5  # the output weight (tied or not)
    grads = [(p.grad, q.grad) for p, q in zip(own.parameters(), fused.parameters()) if p.grad is not None]
    assert len(grads) == len(list(own.parameters()))
    assert max(float((p - q).abs().max()) for p, q in grads) < 1e-5  # every weight, through the hidden states


@pytest.mark.parametrize("preset", MOE)
def test_moe_objective_keeps_the_routers_balancing_loss(preset):
    """loss = cross-entropy + router_aux_loss_coef x aux_loss, fused as the model's own; the routers' gradients
    (which come from both terms) match; eval's NLL sum is the cross-entropy alone."""
    own = build_model(preset, 0)
    fused = copy.deepcopy(own)
    install(fused, True)
    x = batch(2)
    a, b = objective(own, x), objective(fused, x)
    coef = own.config.router_aux_loss_coef
    assert a.aux_loss.item() > 1.0 and abs(a.aux_loss.item() - b.aux_loss.item()) < 1e-6
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(own(input_ids=x).logits[:, :-1].reshape(-1, 50257), x[:, 1:].reshape(-1))
        assert abs(b.loss.item() - (ce.item() + coef * b.aux_loss.item())) < 1e-5  # the aux term is in, once
        for model in (own, fused):  # eval: CE only, fused or not
            assert abs(nll_sum(model, x).item() / (x.numel() - x.size(0)) - ce.item()) < 1e-5
    assert abs(a.loss.item() - b.loss.item()) < 1e-5
    a.loss.backward()
    b.loss.backward()
    routers = [(n, p.grad, q.grad) for (n, p), q in zip(own.named_parameters(), fused.parameters())
               if n.endswith("mlp.gate.weight")]
    assert len(routers) == own.config.num_hidden_layers
    assert all(float(g.abs().max()) > 0 for _, g, _ in routers)
    assert max(float((g - h).abs().max()) for _, g, h in routers) < 1e-5


def test_hidden_state_gradient_of_the_fused_function_itself():
    v = 80_000  # a vocabulary large enough for several chunks of 700 tokens
    h = torch.randn(700, 32, requires_grad=True)
    w = (0.1 * torch.randn(v, 32)).requires_grad_(True)
    y = torch.randint(0, v, (700,))
    assert chunk_tokens(v) * 2 < 700
    ChunkedLinearCrossEntropy.apply(h, w, None, y).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    torch.nn.functional.cross_entropy(h @ w.t(), y).backward()
    assert (gh - h.grad).abs().max() < 1e-8 and (gw - w.grad).abs().max() < 1e-8


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_eval_sums_are_unchanged(preset):
    own = build_model(preset, 0).eval()
    fused = copy.deepcopy(own)
    install(fused, True)
    with torch.no_grad():
        a, b = nll_sum(own, batch(1, 4, 64)), nll_sum(fused, batch(1, 4, 64))
    assert a.dtype == b.dtype == torch.float64 and abs(a.item() / b.item() - 1) < 1e-6


def test_lora_keeps_the_output_layer_frozen():
    from distclm.config import LoraConfig
    from distclm.lora import apply_lora

    model = apply_lora(build_model("llama-tiny", 0), LoraConfig(r=4), 0)
    install(model, True)
    mean_loss(model, batch()).backward()
    assert model.get_base_model().lm_head.weight.grad is None
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_off_means_the_models_own_loss():
    model = build_model("gpt2-tiny", 0)
    assert "model's own" in install(model, False) and not is_fused(model)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "mixtral-tiny"])
def test_a_masked_batch_keeps_the_models_own_terms_apart_from_its_label_sum(preset):
    """Masked (chat) micro-batches: `nll_sum` is the labels' cross-entropy sum (scaled by accum x world / N by the
    loop) and `extra` what the model adds itself (a router's coef x aux_loss; 0 for a dense model), fused or not;
    gradients of nll_sum + extra match."""
    from distclm.loss import LOSS, START, masked_objective

    own = build_model(preset, 0)
    fused = copy.deepcopy(own)
    install(fused, True)
    x = batch(3, b=2, t=32)
    flags = torch.zeros_like(x, dtype=torch.uint8)
    flags[:, 0] = START
    flags[0, 10:20] = LOSS  # very different numbers of labels per block
    flags[1, 25:] = LOSS
    a, b = masked_objective(own, x, flags), masked_objective(fused, x, flags)
    assert abs(a.nll_sum.item() - b.nll_sum.item()) < 1e-4
    extra = float(a.extra.detach()) if torch.is_tensor(a.extra) else a.extra
    if preset in MOE:
        assert abs(extra - own.config.router_aux_loss_coef * a.aux_loss.item()) < 1e-5 and extra > 0
    else:
        assert extra == 0.0
    assert abs(extra - float(torch.as_tensor(b.extra).detach())) < 1e-5
    (a.nll_sum + a.extra).backward()
    (b.nll_sum + b.extra).backward()
    grads = [(p.grad, q.grad) for p, q in zip(own.parameters(), fused.parameters()) if p.grad is not None]
    assert max(float((p - q).abs().max()) for p, q in grads) < 1e-5
