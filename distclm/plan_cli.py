"""`distclm plan` and `--train.micro_batch_size=auto`: the configurations that fit, fastest first, and a pick.

    distclm plan --model.name=MODEL [train flags] --plan.world=64 --plan.device_memory=80GB [--plan.output=plan.json]

Candidates: every strategy (ddp, zero1, zero2, zero3) and offload it allows, with and without activation
checkpointing, at every micro-batch that divides the per-rank batch, with the global batch held fixed
(global = --train.global_batch_size, else micro x grad_accum x world of the flags). A configuration fits when its
per-rank peak is at most (1 - margin) of the device's memory. The recommendation is the fastest that fits;
among those within 2% of it, the simplest (lowest ZeRO stage, no offload, no checkpointing, largest micro).
"""

from __future__ import annotations

import dataclasses
import os
import re

from distclm import plan as pm
from distclm.errors import UserError

OFFLOADS = {"ddp": ("none",), "zero1": ("none", "optimizer"), "zero2": ("none", "optimizer"),
            "zero3": ("none", "optimizer", "all")}
ORDER = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "none": 0, "optimizer": 1, "all": 2}
AUTO_MICRO_DEFAULT = 8  # micro auto with no global batch: global = 8 x grad_accum x world (independent of the pick)
ASSUMED_TFLOPS = 400.0  # a device named only by its memory: an H100-class GPU at ~40% of its 989 bf16 TFLOP/s
ASSUMED_GPU_BASELINE = 1 << 30  # CUDA context + NCCL buffers per GPU rank, not in max_memory_allocated


def parse_size(text: str, flag: str) -> int:
    """'80GB' (1e9), '80GiB' (2^30), '512MB', '1.5e9' -> bytes; anything else is refused naming the flag."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"{flag}: expected a positive size like 80GB, 80GiB or 512MB, got {text!r}")
    unit = (m.group(2) or "").rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    return int(float(m.group(1)) * scale[unit])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


# ---------------------------------------------------------------------------------------------
# The device and the process baseline


def device_for(cfg, world: int, local_world: int | None = None, here: bool = False):
    """The device the flags describe, else this machine's: its GPU, or its RAM shared by the ranks on it.
    `here`: a run on this machine (micro auto, summary.json): --plan.device_memory only caps its memory."""
    from distclm.plan_probe import host_measurements

    p = cfg.plan
    gpu = _gpu_here() if p.device_memory is None or here else None
    is_host = (p.device_memory is None or here) and gpu is None
    probe = host_measurements() if is_host else {}  # a GPU rank's baseline is an assumption (or given)
    if p.device_memory is not None:
        memory = parse_size(p.device_memory, "--plan.device_memory")
    elif gpu is not None:
        memory = gpu[0]
    else:
        import psutil

        memory = psutil.virtual_memory().total // max(1, local_world or min(world, os.cpu_count() or 1))
    tflops = p.device_tflops or (probe["matmul_tflops"] if is_host else gpu[1] if gpu else ASSUMED_TFLOPS)
    if p.baseline is not None:
        baseline = parse_size(p.baseline, "--plan.baseline")
    else:
        baseline = probe["baseline_bytes"] if is_host else ASSUMED_GPU_BASELINE
    bandwidth = p.bandwidth_gbps or (40.0 if is_host else 400.0)
    for flag, value in (("--plan.device_tflops", tflops), ("--plan.bandwidth_gbps", bandwidth)):
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    extra = probe["baseline_zero_bytes"] - probe["baseline_bytes"] if is_host and p.baseline is None else 0
    return pm.Device(int(memory), float(tflops), float(bandwidth), int(baseline), is_host, max(0, int(extra)))


def _gpu_here():
    """(memory bytes, sustained TFLOP/s at 40% of the table's peak) of GPU 0, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    from distclm.metrics import peak_tflops_for

    props = torch.cuda.get_device_properties(0)
    peak = peak_tflops_for(props.name)
    return props.total_memory, 0.4 * peak if peak else ASSUMED_TFLOPS


# ---------------------------------------------------------------------------------------------
# Candidates and the recommendation


def global_batch(t, world: int) -> int:
    micro = AUTO_MICRO_DEFAULT if t.micro_batch_size == "auto" else t.micro_batch_size
    g = t.global_batch_size or micro * t.grad_accum * world
    if g % world:
        raise UserError(f"--train.global_batch_size={g} is not a multiple of the world size {world}")
    return g


def base_setup(cfg, world: int, block: int, device) -> pm.Setup:
    t = cfg.train
    g = global_batch(t, world)
    micro = AUTO_MICRO_DEFAULT if t.micro_batch_size == "auto" else t.micro_batch_size
    if (g // world) % micro:
        micro = 1
    half = t.precision in ("bf16", "fp16") or (t.precision == "auto" and not device.is_host)
    return pm.Setup(t.strategy, t.offload, micro, g // world // micro, t.activation_checkpointing, world, block,
                    half, t.fused_loss)


def ds_for(cfg, s: pm.Setup, hidden: int) -> dict | None:
    """The resolved DeepSpeed config of this candidate (bucket sizes), None for ddp."""
    from distclm.ds_config import resolve

    if not s.stage:
        return None
    t = dataclasses.replace(cfg.train, strategy=s.strategy, offload=s.offload, micro_batch_size=s.micro_batch_size,
                            grad_accum=s.grad_accum)
    return resolve(t, s.world, hidden, "bf16" if s.half else "no")


def candidates(base: pm.Setup) -> list[pm.Setup]:
    per_rank = base.micro_batch_size * base.grad_accum
    micros = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
    return [pm.with_(base, strategy=st, offload=off, micro_batch_size=m, grad_accum=per_rank // m,
                     activation_checkpointing=ck)
            for st, offs in OFFLOADS.items() for off in offs for ck in (False, True) for m in micros]


def recommend(configs: list[dict]) -> int | None:
    """Index of the fastest fitting configuration, or of the simplest within 2% of it; None when none fits."""
    fit = [i for i, c in enumerate(configs) if c["fits"]]
    if not fit:
        return None
    best = min(configs[i]["step_time_s"] for i in fit)
    near = [i for i in fit if configs[i]["step_time_s"] <= best * 1.02]
    return min(near, key=lambda i: (ORDER[configs[i]["strategy"]], ORDER[configs[i]["offload"]],
                                    configs[i]["activation_checkpointing"], -configs[i]["micro_batch_size"]))


def evaluate_all(cfg, arch, base: pm.Setup, device, margin: float) -> list[dict]:
    out = [pm.evaluate(arch, s, ds_for(cfg, s, arch.shape.hidden_size), device, margin) for s in candidates(base)]
    return sorted(out, key=lambda c: (c["step_time_s"], c["per_rank_peak_bytes"]))


def block_size_of(cfg) -> int:
    """--data.dir's block size when given (its manifest), else --data.block_size."""
    if cfg.data.dir:
        from pathlib import Path

        manifest = Path(cfg.data.dir.split(",")[0]) / "manifest.json"
        if not manifest.exists():
            raise UserError(f"--data.dir={cfg.data.dir}: no manifest.json there (a prepared folder is needed)")
        from distclm.data.blocks import read_manifest

        return read_manifest(manifest.parent)["block_size"]  # schema-checked: a bad field is one line
    return cfg.data.block_size


def make_plan(cfg, world: int | None = None, device=None, arch=None) -> dict:
    """The plan's JSON: `given` (the flags' configuration, evaluated), `configs` fastest first, `recommended`."""
    from distclm.model import load_config

    if not cfg.model.name:
        raise UserError("--model.name is required: a hub id, a Hugging Face folder, a run dir, or a preset")
    world = world or cfg.plan.world
    if world < 1:
        raise UserError(f"--plan.world must be at least 1, got {world}")
    if not 0 <= cfg.plan.margin < 1:
        raise UserError(f"--plan.margin must be in [0, 1), got {cfg.plan.margin}")
    device = device or device_for(cfg, world)
    arch = arch or pm.arch_of(load_config(cfg.model.name, cfg.model.trust_remote_code), cfg.lora)
    base = base_setup(cfg, world, block_size_of(cfg), device)
    given = pm.evaluate(arch, base, ds_for(cfg, base, arch.shape.hidden_size), device, cfg.plan.margin)
    configs = evaluate_all(cfg, arch, base, device, cfg.plan.margin)
    about = {"model": cfg.model.name, "world": world, "global_batch_size": base.micro_batch_size * base.grad_accum
             * world, "block_size": base.block_size, "precision": "bf16" if base.half else "fp32",
             "fused_loss": base.fused_loss, "lora_r": cfg.lora.r, "params_total": arch.total,
             "params_trainable": arch.trainable, "params_active": arch.matmul_active,
             "device_memory_bytes": device.memory_bytes, "device_tflops": device.tflops,
             "bandwidth_gbps": device.bandwidth_gbps, "baseline_bytes": device.baseline_bytes,
             "device_is_host": device.is_host, "margin": cfg.plan.margin}
    return {"given": {**about, **given}, "configs": configs, "recommended": recommend(configs)}


# ---------------------------------------------------------------------------------------------
# --train.micro_batch_size=auto


def resolve_auto_micro(cfg, world: int, log=None):
    """`cfg` with micro auto replaced by the largest micro-batch the plan says fits this device (or
    --plan.device_memory), the strategy, offload and checkpointing as given, and the global batch made explicit
    so accumulation keeps it exact: the same global batch whatever the pick."""
    t = cfg.train
    if t.micro_batch_size != "auto" or not cfg.model.name:
        return cfg
    g = global_batch(t, world)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    plan_cfg = dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, world=world))
    from distclm.model import load_config

    device = device_for(plan_cfg, world, local, here=True)  # --plan.device_memory caps it when given
    arch = pm.arch_of(load_config(cfg.model.name, cfg.model.trust_remote_code), cfg.lora)
    base = base_setup(plan_cfg, world, block_size_of(cfg), device)
    per_rank = g // world
    micro, row = 1, None
    for m in sorted((m for m in range(1, per_rank + 1) if per_rank % m == 0), reverse=True):
        s = pm.with_(base, micro_batch_size=m, grad_accum=per_rank // m)
        row = pm.evaluate(arch, s, ds_for(cfg, s, arch.shape.hidden_size), device, cfg.plan.margin)
        if row["fits"]:
            micro = m
            break
    verdict = "fits" if row and row["fits"] else "does not fit even at micro 1"
    from distclm import dist

    log = log or (lambda line: print(line, flush=True) if dist.is_rank0() else None)
    log(f"micro-batch auto: {micro} (accumulation {per_rank // micro}, global batch {g}); predicted per-rank "
        f"peak {gb(row['per_rank_peak_bytes'])} of {gb(device.memory_bytes)} ({verdict}, margin {cfg.plan.margin:.0%})")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, micro_batch_size=micro, global_batch_size=g))


def lower_after_oom(cfg, exc: BaseException, world: int):
    """After a CUDA out-of-memory error under micro auto: the config at the next smaller micro-batch (a divisor of
    the per-rank batch, so the global batch stays exact), or None (not that case, or micro 1 already).
    Every rank must hit the error (equal micro-batches make equal shapes): a rank that did not waits in a
    collective until --train.hang_timeout_s. Not exercised by the tests: they run on CPUs."""
    import torch

    if cfg.train.micro_batch_size != "auto" or not isinstance(exc, torch.OutOfMemoryError) \
            or not torch.cuda.is_available():
        return None
    picked = resolve_auto_micro(cfg, world, log=lambda _: None)
    g, m = picked.train.global_batch_size, picked.train.micro_batch_size
    smaller = [d for d in range(1, m) if (g // world) % d == 0]
    if not smaller:
        return None
    torch.cuda.empty_cache()
    from distclm import dist

    if dist.is_rank0():
        print(f"micro-batch auto: out of memory at micro {m}; again at micro {smaller[-1]} (accumulation "
              f"{g // world // smaller[-1]}, global batch {g})", flush=True)
    return dataclasses.replace(picked, train=dataclasses.replace(picked.train, micro_batch_size=smaller[-1]))


def predicted_for_run(cfg, world: int, block: int) -> int | None:
    """predicted_bytes, or None when the plan cannot model this architecture (the run goes on without it)."""
    try:
        return predicted_bytes(cfg, world, block)
    except Exception as exc:  # noqa: BLE001 - a model the meta device cannot build must not stop training
        from distclm import dist

        if dist.is_rank0():
            print(f"memory plan unavailable for {cfg.model.name}: {str(exc).splitlines()[0][:200]}", flush=True)
        return None


def predicted_bytes(cfg, world: int, block: int) -> int:
    """The plan's per-rank peak for this run as configured, comparable with what the run measures (on a GPU the
    CUDA context is left out: torch.cuda.max_memory_allocated does not see it)."""
    from distclm.model import load_config

    arch = pm.arch_of(load_config(cfg.model.name, cfg.model.trust_remote_code), cfg.lora)
    plan_cfg = dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, world=world, device_memory=None))
    device = device_for(plan_cfg, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)), here=True)
    if not device.is_host:
        device = dataclasses.replace(device, baseline_bytes=0)
    t = cfg.train
    s = pm.Setup(t.strategy, t.offload, t.micro_batch_size, t.grad_accum, t.activation_checkpointing, world, block,
                 base_setup(plan_cfg, world, block, device).half, t.fused_loss)
    return pm.evaluate(arch, s, ds_for(cfg, s, arch.shape.hidden_size), device, 0.0)["per_rank_peak_bytes"]


def measured_peak_bytes(device) -> int:
    """This process's peak so far: torch.cuda.max_memory_allocated on a GPU, the peak resident set on a CPU."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    # VmHWM: this process image's peak resident set. Not getrusage's ru_maxrss: Linux carries that across exec, so
    # a rank started by a big parent (a test runner, `distclm run`) would report the parent's peak.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def memory_summary(predicted: int, device) -> dict:
    """summary.json's `memory`: the plan's per-rank peak for this run (computed in train's plan phase, before
    DeepSpeed's ZeRO-3 config is registered: transformers would then build even a meta model through it) and the
    largest peak measured over the ranks."""
    from distclm import dist

    return {"predicted_bytes": predicted, "peak_bytes": max(dist.all_gather_object(measured_peak_bytes(device)))}
