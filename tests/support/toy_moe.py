"""A tiny mixture-of-experts causal LM defined here, the way a user's or a hub repository's own code would be:
each expert a separate module (a ModuleList of MLPs), a Linear router, a load-balancing loss added to the loss.
No attention: the embedding goes through the sparse blocks to the output layer (a bigram model), enough to route.

Forced routing (config.forced_routing): a block (sequence) whose FIRST token id is a multiple of 4 routes only
among experts 0 and 1; other blocks among all experts. The routing is a function of the data only, so 1 and N processes compute
the same numbers, and a rank holding only even blocks in a step never reaches experts 2.. in that step: under
ZeRO-3 those experts' parameters are gathered by the other rank only, unless the block is a ZeRO-3 leaf.
router_bias (config): added to every router logit, a collapse forced onto some experts.

Registered with transformers' Auto classes by `register()` (in child processes: hooks/sitecustomize.py with
DISTCLM_TEST_TOY_MOE=1), then loaded from a saved folder like any model: --model.name=FOLDER.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast


class ToyMoeConfig(PretrainedConfig):
    model_type = "toy_moe"

    def __init__(self, vocab_size=50257, hidden_size=32, num_hidden_layers=2, num_attention_heads=1, n_experts=4,
                 num_experts_per_tok=2, router_aux_loss_coef=0.02, output_router_logits=True, forced_routing=True,
                 max_position_embeddings=1024, router_bias=None, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.n_experts, self.num_experts_per_tok = num_attention_heads, n_experts, num_experts_per_tok
        self.router_aux_loss_coef, self.output_router_logits = router_aux_loss_coef, output_router_logits
        self.forced_routing, self.max_position_embeddings = forced_routing, max_position_embeddings
        self.router_bias = router_bias  # (E,) added to every router logit: a collapse forced onto some experts
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class ToyExpert(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.up, self.down = nn.Linear(h, 2 * h, bias=False), nn.Linear(2 * h, h, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class ToySparseBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.k, self.forced = config.num_experts_per_tok, config.forced_routing
        self.router = nn.Linear(config.hidden_size, config.n_experts, bias=False)
        self.bias = config.router_bias
        self.experts = nn.ModuleList(ToyExpert(config.hidden_size) for _ in range(config.n_experts))

    def forward(self, x, barred_blocks):  # x (B, T, H); barred_blocks (B,) bool: route among experts 0 and 1 only
        logits = self.router(x)  # (B, T, E)
        if self.bias is not None:
            logits = logits + torch.tensor(self.bias, dtype=logits.dtype, device=logits.device)
        if self.forced:
            barred = torch.zeros_like(logits, dtype=torch.bool)
            barred[..., 2:] = barred_blocks[:, None, None]
            logits = logits.masked_fill(barred, -1e4)
        flat, h = logits.reshape(-1, logits.size(-1)), x.reshape(-1, x.size(-1))
        weights, chosen = flat.softmax(-1).topk(self.k, dim=-1)  # (N, k)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel():  # as the sparse blocks of real models: an expert no token chose does not run
                out.index_add_(0, rows, expert(h[rows]) * weights[rows, slot, None])
        return x + out.reshape(x.shape), flat


class ToyMoeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ToyMoeConfig
    base_model_prefix = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(ToySparseBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, labels=None, output_router_logits=None, **kwargs):
        x, barred = self.embed(input_ids), input_ids[:, 0] % 4 == 0
        router_logits = []
        for block in self.blocks:
            x, logits = block(x, barred)
            router_logits.append(logits)
        logits = self.lm_head(self.norm(x))
        loss = self.loss_function(logits, labels, self.config.vocab_size) if labels is not None else None
        aux = None
        if self.config.output_router_logits if output_router_logits is None else output_router_logits:
            aux = balancing_loss(router_logits, self.config.n_experts, self.config.num_experts_per_tok)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=logits, router_logits=tuple(router_logits))


def balancing_loss(router_logits, n: int, k: int) -> torch.Tensor:
    """Switch Transformer's: n x sum_e (share of token-slots routed to e) x (mean router probability of e)."""
    logits = torch.cat(router_logits)
    probs = logits.softmax(-1)
    slots = F.one_hot(probs.topk(k, dim=-1).indices, n).float().sum(1).mean(0) / k
    return n * (slots * probs.mean(0)).sum()


def register() -> None:
    AutoConfig.register("toy_moe", ToyMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(ToyMoeConfig, ToyMoeForCausalLM, exist_ok=True)


def save(folder, seed: int = 0, **config) -> None:
    """A seeded random toy MoE saved as a Hugging Face folder."""
    register()
    torch.manual_seed(seed)
    ToyMoeForCausalLM(ToyMoeConfig(**config)).save_pretrained(folder)
