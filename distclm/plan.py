"""Per-rank peak memory and step time of a training configuration, from the model's architecture alone.

No weights, no process group: the parameter shapes come from the model built on torch's "meta" device
(every architecture transformers knows, LoRA adapters and MoE experts included), the rest from formulas.
P = all parameters, T = trainable ones (LoRA: the adapters), w = world size, L = layers, h = hidden size,
B = micro-batch, S = block size, V = vocabulary. Bytes per element: weights/grads `wb` (fp32 4; under ZeRO
with bf16/fp16 DeepSpeed casts the model: 2; DDP's autocast keeps fp32 weights and grads).

    weights        P * wb                        zero3: / w            offload=all: on the host
    gradients      T * wb as backward makes them (zero2 on a GPU: 0, reduced bucket by bucket; zero3: the
                   largest module's, max(V h, (P - V h) / L) * wb)
    grad partition T * wb / w (zero1-3: the reduced share)   ddp: + DDP's bucket copy T * 4
    master         T * 4 / w (ZeRO in bf16; in fp32 the master is the partition itself: 0)
    optimizer      T * 8 (Adam m, v)             zero1-3: / w          offload: on the host
    activations    B * S * (L * a_layer + 3h) * ab    checkpointing: B * S * (L * h + a_layer + 3h) * ab
    output layer   fused: c * V * 4 (the loss's kept chunk) + B * S * h * 4;  else 4 * B * S * V * 4
    ZeRO buffers   reduce bucket; zero3: the gathered layers (max_live + prefetch + the embedding) * wb
    baseline       the process itself (torch, transformers, DeepSpeed imported; ZeRO: + DeepSpeed's engine),
                   measured once on this machine (plan_probe.py), cached

a_layer, elements saved for backward per token and layer: attention 2h (norm in/out) + 3q + 2kv (+ q + kv
rotated copies with rotary) with q = heads x head_dim, kv = kv_heads x head_dim; MLP 2h + 4f gated (gate,
up, act(gate), their product) or (2 + e) f plain (fc out, act out, + e for an activation composed of
Python ops: e = 3 for the tanh GELU written out); f = the MLP width (MoE: top_k x expert width + shared).

Step time (upper bound: communication not overlapped with compute):
    compute  = flops_per_token(N_active) * B * S * accum / device FLOP/s   (checkpointing: x 4/3, one more fwd)
    comm     = bytes / bandwidth, ring collectives, r = (w - 1) / w, per optimizer step:
               ddp, zero1: all-reduce 2 r T gb  (zero1 as reduce-scatter + all-gather: the same bytes)
               zero2: r T gb per micro-batch (reduce-scatter each backward) + r P wb (all-gather of updates)
               zero3: 2 r P wb per micro-batch (all-gather forward and backward) + r T gb per micro-batch
    offload  = host Adam over T / w (16 bytes each at host memory speed) + T / w (gb + wb) over PCIe
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from distclm.ds_config import zero_stage
from distclm.loss import chunk_tokens
from distclm.metrics import flops_per_token
from distclm.model import ModelShape, matmul_parameters, parameter_counts

GiB = 1 << 30
HOST_ADAM_BPS = 20e9  # bytes/s a host Adam step moves (m, v, weights, grads: 16 bytes per element)
PCIE_BPS = 25e9       # bytes/s between host and device (PCIe 4 x16, one direction, achieved)
COMPOSED_ACTS = {"gelu_new": 3, "gelu_fast": 3}  # activations written as Python ops: extra saved tensors per f


@dataclass(frozen=True)
class Arch:
    """What the plan needs to know about a model, counted from its architecture."""

    shape: ModelShape
    total: int            # P: every parameter element, tied ones once
    trainable: int        # T
    matmul_active: int    # parameters in a matmul per token (MoE: the routed experts' share only)
    q_dim: int
    kv_dim: int
    ffn: int              # MLP width a token passes through (MoE: top_k experts + shared)
    gated: bool
    act_extra: int
    rotary: bool

    def per_layer_elements(self) -> int:
        """a_layer: elements saved for backward per token in one layer (formula in the module docstring)."""
        h, q, kv, f = self.shape.hidden_size, self.q_dim, self.kv_dim, self.ffn
        attn = 2 * h + 3 * q + 2 * kv + ((q + kv) if self.rotary else 0)
        mlp = 2 * h + (4 * f if self.gated else (2 + self.act_extra) * f)
        return attn + mlp


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def mlp_width(config) -> int:
    """Width of the MLP a token goes through: dense, or top_k experts (+ a shared expert) for MoE."""
    t = _text(config)
    h = int(t.hidden_size)
    dense = getattr(t, "intermediate_size", None) or getattr(t, "n_inner", None) or 4 * h
    top_k = getattr(t, "num_experts_per_tok", None)
    if not top_k:
        return int(dense)
    expert = getattr(t, "moe_intermediate_size", None) or dense
    return int(top_k) * int(expert) + int(getattr(t, "shared_expert_intermediate_size", 0) or 0)


def expert_fraction(config) -> float:
    """Share of the experts' parameters one token uses: top_k / n_experts (1 for a dense model)."""
    t = _text(config)
    n = getattr(t, "num_local_experts", None) or getattr(t, "num_experts", None)
    k = getattr(t, "num_experts_per_tok", None)
    return float(k) / float(n) if n and k else 1.0


def arch_of(config, lora=None) -> Arch:
    """Count the model's parameters on the meta device (no memory, no weights) and read its widths."""
    import torch
    from transformers import AutoModelForCausalLM

    from distclm.lora import apply_lora, enabled

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if lora is not None and enabled(lora):
            model = apply_lora(model, lora, 0)
    names = [n for n, _ in model.named_parameters()]
    trainable, total = parameter_counts(model)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = matmul_parameters(model) - round(experts * (1.0 - expert_fraction(config)))
    shape, t = ModelShape.of(config), _text(config)
    kv_heads = int(getattr(t, "num_key_value_heads", None) or shape.num_heads)
    rotary = any(hasattr(t, k) for k in ("rope_theta", "rotary_pct", "rope_scaling", "rope_parameters"))
    return Arch(shape, total, trainable, active, shape.num_heads * shape.head_dim, kv_heads * shape.head_dim,
                mlp_width(config), any(k in n for n in names for k in ("gate_proj", "gate_up", ".w3.")),
                COMPOSED_ACTS.get(str(getattr(t, "hidden_act", getattr(t, "activation_function", ""))), 0),
                rotary)


@dataclass(frozen=True)
class Setup:
    """One training configuration on one rank."""

    strategy: str
    offload: str
    micro_batch_size: int
    grad_accum: int
    activation_checkpointing: bool
    world: int
    block_size: int
    half: bool           # bf16/fp16 (else fp32)
    fused_loss: bool

    @property
    def stage(self) -> int:
        return zero_stage(self.strategy) or 0


@dataclass(frozen=True)
class Device:
    """The device one rank runs on: its memory, sustained FLOP/s, the interconnect, the process's own bytes."""

    memory_bytes: int
    tflops: float
    bandwidth_gbps: float  # Gbit/s each rank sends and receives at in collectives
    baseline_bytes: int
    is_host: bool          # CPU ranks: host offload lands in the same memory
    zero_extra_bytes: int = 0  # what DeepSpeed's engine adds to a ZeRO rank's baseline (measured on CPU ranks)


def model_state_parts(a: Arch, s: Setup, ds: dict | None, host: bool = False) -> dict[str, int]:
    """Weights, gradients, master copies and Adam states of one rank, as the strategy partitions them.
    `host`: CPU ranks (see `gradients` below)."""
    P, T, w, z = a.total, a.trainable, s.world, s.stage
    wb = 2 if (s.half and z) else 4
    shard = lambda n, stage: n / w if z >= stage else n  # noqa: E731 - ZeRO stage `stage` partitions n
    # Gradients as backward makes them, full size: ddp and zero1 keep them all until the step; so does zero2 on
    # CPU ranks (measured: bench/plan.py), while on a GPU it reduces bucket by bucket into the partition. zero3
    # holds one module's whole gradient at a time: the largest is the output layer's (V x h, which the fused
    # loss makes in forward) or one layer's.
    largest = max(a.shape.vocab_size * a.shape.hidden_size, (P - a.shape.vocab_size * a.shape.hidden_size)
                  // a.shape.num_layers)
    in_flight = T if (z <= 1 or (z == 2 and host)) else min(T, largest) if z == 3 else 0
    parts = {"weights": shard(P * wb, 3), "gradients": in_flight * wb,
             "gradient partition": T * wb / w if z else 0,
             "master weights": T * 4 / w if (z and wb == 2) else 0,
             "optimizer states": shard(T * 8, 1)}
    if z == 0:
        parts["ddp buckets"] = T * 4  # accelerate's DDP: gradient_as_bucket_view=False, a second copy
    zo = (ds or {}).get("zero_optimization", {})
    if z >= 2:
        overlap = 2 if zo.get("overlap_comm") else 1
        parts["zero buffers"] = int(zo.get("reduce_bucket_size", 5e8)) * wb * overlap
    if z == 3:
        live = int(zo.get("stage3_max_live_parameters", 1e9)) + int(zo.get("stage3_prefetch_bucket_size", 5e7))
        embedding = a.shape.vocab_size * a.shape.hidden_size
        parts["zero buffers"] += min(P, live + embedding) * wb
    host = {}
    if s.offload in ("optimizer", "all"):
        host = {k: parts.pop(k) for k in ("optimizer states", "master weights")}
        host["master weights"] = T * 4 / w  # DeepSpeedCPUAdam keeps its fp32 master on the host
    if s.offload == "all":
        host["weights"] = parts.pop("weights")
    parts = {k: int(v) for k, v in parts.items()}
    parts.update({f"host: {k}": int(v) for k, v in host.items()})
    return parts


def activation_parts(a: Arch, s: Setup) -> dict[str, int]:
    """Activations saved for backward and the output layer's logits, for one micro-batch."""
    tokens, h, L, V = s.micro_batch_size * s.block_size, a.shape.hidden_size, a.shape.num_layers, a.shape.vocab_size
    ab = 2 if s.half else 4
    layer = a.per_layer_elements()
    kept = L * h + layer if s.activation_checkpointing else L * layer
    if s.fused_loss:
        output = chunk_tokens(V) * V * 4 + tokens * h * 4
    else:
        output = 4 * tokens * V * 4  # logits, log-softmax (saved), and two gradients of their size in backward
    return {"activations": int(tokens * (kept + 3 * h) * ab), "output layer": int(output)}


def memory_parts(a: Arch, s: Setup, ds: dict | None, device: Device) -> dict[str, int]:
    """Every part of one rank's peak, bytes; `host: ...` parts live in host memory."""
    baseline = device.baseline_bytes + (device.zero_extra_bytes if s.stage else 0)
    return {**model_state_parts(a, s, ds, device.is_host), **activation_parts(a, s), "process baseline": baseline}


def per_rank_peak(parts: dict[str, int], device: Device) -> int:
    """The device's share: host parts count only when the device is the host (CPU ranks)."""
    return sum(v for k, v in parts.items() if device.is_host or not k.startswith("host: "))


def step_time(a: Arch, s: Setup, device: Device) -> dict[str, float]:
    """Seconds per optimizer step: compute, communication and host offload (formulas in the docstring)."""
    tokens = s.micro_batch_size * s.block_size * s.grad_accum
    fpt = flops_per_token(a.matmul_active, a.shape.num_layers, a.q_dim, s.block_size)
    compute = fpt * tokens / (device.tflops * 1e12) * (4 / 3 if s.activation_checkpointing else 1)
    P, T, w, z = a.total, a.trainable, s.world, s.stage
    wb = 2 if (s.half and z) else 4
    r = (w - 1) / w
    if z <= 1:
        moved = 2 * r * T * (4 if z == 0 else wb)
    elif z == 2:
        moved = r * T * wb * s.grad_accum + r * P * wb
    else:
        moved = (2 * r * P * wb + r * T * wb) * s.grad_accum
    comm = moved / (device.bandwidth_gbps * 1e9 / 8)
    offload = 0.0
    if s.offload != "none":
        offload = T / w * 16 / HOST_ADAM_BPS + (0 if device.is_host else T / w * (wb + wb) / PCIE_BPS)
    if s.offload == "all" and not device.is_host:
        offload += 3 * P / w * wb * s.grad_accum / PCIE_BPS  # this rank's shard up for fwd, bwd, and the update
    total = compute + comm + offload
    return {"step_time_s": total, "compute_s": compute, "comm_s": comm, "offload_s": offload}


def evaluate(a: Arch, s: Setup, ds: dict | None, device: Device, margin: float) -> dict:
    """One configuration as the plan's JSON lists it."""
    parts = memory_parts(a, s, ds, device)
    peak = per_rank_peak(parts, device)
    return {"strategy": s.strategy, "offload": s.offload, "micro_batch_size": s.micro_batch_size,
            "grad_accum": s.grad_accum, "activation_checkpointing": s.activation_checkpointing,
            "per_rank_peak_bytes": peak, "parts": parts, **step_time(a, s, device),
            "fits": peak <= device.memory_bytes * (1.0 - margin)}


def with_(s: Setup, **changes) -> Setup:
    return dataclasses.replace(s, **changes)
