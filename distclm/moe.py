"""Mixture-of-experts models, seen from their structure: sparse blocks, active parameters, expert load.

A sparse block is a module with two children: the experts, and a router scoring them (docs/moe.md).

    experts   a ModuleList of >= 2 structurally identical modules (one module per expert: "separate"), or one
              module whose parameters all stack the experts on their first dimension, (E, ...) ("fused", the
              transformers 5 layout)
    router    a child with a 2-D weight of shape (E, hidden): its logits choose top_k of the E experts per token

No class or attribute names are read, so a model's own MoE code (remote code, older layouts) is found too.

ZeRO-3 gathers a module's parameters when that module runs. Separate experts that some rank routes no token to
are never gathered there while another rank waits for it: a hang (DeepSpeed #4808). Marking the block a ZeRO-3
leaf gathers all its experts at the block's forward on every rank. A fused layout is one parameter: always run.

Active parameters (FLOPs per token): each token passes through top_k of E experts, so an expert weight counts
top_k / E of its size:  active = total - sum_blocks expert_params x (1 - top_k / E).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distclm.errors import UserError

TOP_K_FIELDS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts")  # configs' names for top_k


@dataclass(frozen=True)
class SparseBlock:
    name: str
    module: torch.nn.Module
    experts: torch.nn.Module
    n_experts: int
    separate: bool  # one module per expert (ZeRO-3 must treat the block as a leaf)


def _shape(p) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3: the full shape of a partitioned parameter


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _signature(m: torch.nn.Module) -> tuple:
    return type(m), tuple((n, _shape(p)) for n, p in m.named_parameters())


def _n_experts(child: torch.nn.Module) -> tuple[int, bool] | None:
    """(E, separate) when `child` holds experts in one of the two layouts, else None."""
    if isinstance(child, torch.nn.ModuleList):
        sigs = {_signature(m) for m in child}
        if len(child) >= 2 and len(sigs) == 1 and next(iter(sigs))[1]:
            return len(child), True
        return None
    own = list(child.parameters(recurse=False))
    firsts = {_shape(p)[0] if len(_shape(p)) >= 3 else None for p in own}
    if own and len(firsts) == 1 and None not in firsts and firsts != {1}:
        return firsts.pop(), False
    return None


def _is_router(child: torch.nn.Module, n: int) -> bool:
    w = getattr(child, "weight", None)
    return isinstance(w, torch.nn.Parameter) and len(_shape(w)) == 2 and _shape(w)[0] == n


def sparse_blocks(model: torch.nn.Module) -> list[SparseBlock]:
    """Every sparse block of `model`, in module order."""
    found = []
    for name, module in model.named_modules():
        children = list(module.children())
        for child in children:
            got = _n_experts(child)
            if got and any(_is_router(c, got[0]) for c in children if c is not child):
                found.append(SparseBlock(name, module, child, got[0], got[1]))
                break
    return found


def top_k(config) -> int | None:
    """Experts per token, from the configuration (None: not a mixture of experts, or not said)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in TOP_K_FIELDS:
        if isinstance(getattr(text, key, None), int):
            return int(getattr(text, key))
    return None


def inactive_parameters(model: torch.nn.Module, k: int | None) -> int:
    """Parameters a token does not pass through: expert_params x (1 - k / E) summed over sparse blocks."""
    if not k:
        return 0
    return round(sum(sum(_numel(p) for p in b.experts.parameters()) * (1 - min(k, b.n_experts) / b.n_experts)
                     for b in sparse_blocks(model)))


def z3_leaves(model: torch.nn.Module, spec: str) -> list[torch.nn.Module]:
    """The modules ZeRO-3 must gather whole (--train.z3_leaf_modules): `auto` = sparse blocks whose experts are
    separate modules; `none`; or a comma list of class names, with `auto` among them to add the rule's."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    leaves = [b.module for b in sparse_blocks(model) if b.separate] if "auto" in names else []
    for cls in (n for n in names if n not in ("auto", "none")):
        named = [m for m in model.modules() if type(m).__name__ == cls or
                 f"{type(m).__module__}.{type(m).__qualname__}" == cls]
        if not named:
            raise UserError(f"--train.z3_leaf_modules: no module of class {cls!r} in the model; its sparse block "
                            f"classes: {', '.join(sorted({type(b.module).__name__ for b in sparse_blocks(model)})) or 'none found'}")
        leaves += [m for m in named if all(m is not x for x in leaves)]
    return leaves


class RouterStats:
    """This rank's view of the routers during training, kept without any collective of its own: the model's
    aux_loss per step, and the token-slots routed to each expert of each layer since the last log step, counted
    from the router logits the model returns (a token's top_k highest logits are its experts, as its routers pick
    them; the load-balancing loss counts them the same way). Both ride on the loop's one all-reduce per step.

        max_share = max over layers of (busiest expert's slots / all slots of that layer)     1/E: balanced
        idle      = number of (layer, expert) pairs with no slot in the interval
    """

    def __init__(self, k: int):
        self.k = k
        self.counts = None  # (layers, E) float64 since the last log step
        self.aux_sum, self.n = None, 0  # this step's aux_loss summed over its micro-batches

    @torch.no_grad()
    def add(self, out) -> None:
        """One micro-batch's model output (its `aux_loss`, and `router_logits`: per sparse layer (tokens, E))."""
        aux = getattr(out, "aux_loss", None)
        if torch.is_tensor(aux):
            self.aux_sum = aux.detach().double() + (self.aux_sum if self.aux_sum is not None else 0)
            self.n += 1
        rows = [torch.bincount(g.topk(min(self.k, g.size(-1)), dim=-1).indices.reshape(-1), minlength=g.size(-1))
                for g in getattr(out, "router_logits", None) or ()]
        if rows:
            now = torch.stack(rows).double()
            self.counts = now if self.counts is None else self.counts + now

    def payload(self, log_step: bool, device) -> torch.Tensor | None:
        """[this step's mean aux_loss (nan: none), then at a log step the interval's counts] -> summed over ranks."""
        if self.aux_sum is None and self.counts is None:
            return None
        aux = self.aux_sum / self.n if self.aux_sum is not None else torch.tensor(float("nan"), dtype=torch.float64)
        parts = [aux.reshape(1).to(device)]
        self.aux_sum, self.n = None, 0
        if log_step and self.counts is not None:
            self.shape, counts, self.counts = self.counts.shape, self.counts, None
            parts.append(counts.reshape(-1).to(device))
        return torch.cat(parts)

    def figures(self, summed: torch.Tensor | None, world: int) -> dict:
        """The all-reduced payload -> {"aux_loss": mean over ranks, "experts": {...} at a log step}."""
        if summed is None:
            return {}
        aux = float(summed[0]) / world
        out = {"aux_loss": aux if aux == aux else None}
        if summed.numel() > 1:
            out["experts"] = load_figures(summed[1:].reshape(self.shape).cpu())
        return out


def load_figures(counts: torch.Tensor) -> dict:
    """(layers, E) token-slot counts -> {"max_share", "idle"}."""
    share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    return {"max_share": float(share.max()), "idle": int((counts == 0).sum())}
