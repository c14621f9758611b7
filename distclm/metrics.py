"""Throughput, FLOPs per token and MFU: pure functions and a small meter, no torch at import.

FLOPs per token for a decoder-only transformer (Kaplan et al. 2020, the PaLM paper's appendix B),
from the model's own shape:

    flops_per_token = 6 * N  +  12 * n_layers * (n_heads * head_dim) * seq_len

6N: forward (2N) + backward (4N) FLOPs for each parameter that takes part in a matmul: N is the
parameter count less embedding lookups (input and position embeddings); an embedding tied to the
output layer stays in, as it is the LM head's matmul (model.matmul_parameters). The second term is
attention's QK^T and AV, which have no parameters: per layer and token 2 matmuls x 2 FLOPs x seq_len
x (heads x head dim) forward, x3 with backward. A fused loss does the same matmuls (chunk by chunk).

A mixture of experts counts its ACTIVE parameters in N: a token passes through top_k of a layer's E experts,
so each expert weight counts top_k / E of its size (moe.inactive_parameters):

    N = matmul parameters - sum over sparse blocks of (expert parameters x (1 - top_k / E))

    MFU = tokens_per_s * flops_per_token / (peak_flops_per_device * n_devices)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

# Dense bf16/fp16 tensor-core peaks (no sparsity), TFLOP/s per device, from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
    "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "V100": 125.0, "T4": 65.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0, "MI300X": 1307.0, "MI250X": 383.0,
}


def flops_per_token(matmul_params: int, n_layers: int, attn_width: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N + 12 * n_layers * attn_width * seq_len (attn_width = heads x head dim)."""
    return 6.0 * matmul_params + 12.0 * n_layers * attn_width * seq_len


def peak_tflops_for(device_name: str | None, override: float | None = None) -> float | None:
    """Peak TFLOP/s of a device by name (longest matching table key), the override, or None (unknown/CPU)."""
    if override is not None:
        return override
    if not device_name:
        return None
    matches = [k for k in PEAK_TFLOPS if k.lower() in device_name.lower()]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def mfu(tokens_per_s: float, flops_tok: float, peak_tflops: float | None, n_devices: int) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_tok / (peak_tflops * 1e12 * n_devices)


@dataclass
class ThroughputMeter:
    """Tokens/s over a sliding window of steps (the first step, with its warm-up, is left out)."""

    flops_per_token: float
    n_devices: int
    peak_tflops: float | None = None
    window: int = 20
    _times: list = field(default_factory=list)
    _tokens: list = field(default_factory=list)

    def update(self, tokens: int, now: float | None = None) -> None:
        """Call once per optimizer step with the global tokens of that step."""
        self._times.append(time.perf_counter() if now is None else now)
        self._tokens.append(tokens)
        if len(self._times) > self.window + 1:
            self._times.pop(0)
            self._tokens.pop(0)

    @property
    def tokens_per_s(self) -> float | None:
        if len(self._times) < 2:
            return None
        dt = self._times[-1] - self._times[0]
        return sum(self._tokens[1:]) / dt if dt > 0 else None

    @property
    def mfu(self) -> float | None:
        tps = self.tokens_per_s
        return None if tps is None else mfu(tps, self.flops_per_token, self.peak_tflops, self.n_devices)


def device_name(device) -> str | None:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def memory_bytes(device) -> int:
    """Peak allocated device memory on GPU; resident memory of this process on CPU."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


class MetricsFile:
    """RUN/metrics.jsonl: one JSON record per line, appended (a resumed run appends)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
