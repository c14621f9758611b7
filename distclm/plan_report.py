"""`distclm plan` and what it prints: the given configuration's parts, the configurations that fit (fastest first,
the recommended one marked and why), and, when nothing fits, what would: more ranks, LoRA, a smaller block."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from distclm.atomic import atomic_write, check_writable, disk_full_is_one_line
from distclm.plan_cli import gb, make_plan

SHOWN = 12  # fitting configurations listed (all of them are in --plan.output)


def name_of(c: dict) -> str:
    off = "" if c["offload"] == "none" else f"+offload {c['offload']}"
    ck = ", ckpt" if c["activation_checkpointing"] else ""
    return f"{c['strategy']}{off}, micro {c['micro_batch_size']}, accum {c['grad_accum']}{ck}"


def parts_table(g: dict) -> list[str]:
    lines = [f"per-rank peak of the given configuration ({name_of(g)}):"]
    for name, n in g["parts"].items():
        lines.append(f"  {name:<22} {gb(n):>12}")
    lines.append(f"  {'total (device)':<22} {gb(g['per_rank_peak_bytes']):>12}   of {gb(g['device_memory_bytes'])}"
                 f" ({'fits' if g['fits'] else 'does NOT fit'} with a {g['margin']:.0%} margin)")
    lines.append(f"  step time {g['step_time_s']:.3g} s = compute {g['compute_s']:.3g} + communication "
                 f"{g['comm_s']:.3g} + offload {g['offload_s']:.3g}")
    return lines


def why(configs: list[dict], rec: int) -> str:
    """The recommendation against the best of every other strategy/offload: slower by how much, or not fitting."""
    r = configs[rec]
    notes = []
    for st, off in {(c["strategy"], c["offload"]) for c in configs} - {(r["strategy"], r["offload"])}:
        rows = [c for c in configs if (c["strategy"], c["offload"]) == (st, off)]
        fit = [c for c in rows if c["fits"]]
        label = st + ("" if off == "none" else f"+offload {off}")
        if fit:
            notes.append((0, fit[0]["step_time_s"], f"{label} {fit[0]['step_time_s'] / r['step_time_s'] - 1:+.0%}"))
        else:
            need = min(c["per_rank_peak_bytes"] for c in rows)
            notes.append((1, need, f"{label} does not fit (needs {gb(need)})"))
    notes.sort()
    return (f"recommended: {name_of(r)}: {gb(r['per_rank_peak_bytes'])} per rank, {r['step_time_s']:.3g} s/step; "
            f"the fastest that fits (simplest within 2%); others per step: " + "; ".join(n for *_, n in notes))


def render(plan: dict) -> str:
    g, configs, rec = plan["given"], plan["configs"], plan["recommended"]
    lines = [f"{g['model']}: {g['params_total']:,} parameters ({g['params_trainable']:,} trainable, "
             f"{g['params_active']:,} in matmuls per token); {g['world']} rank(s), global batch "
             f"{g['global_batch_size']} x {g['block_size']} tokens, {g['precision']}",
             f"device: {gb(g['device_memory_bytes'])}, {g['device_tflops']:.3g} TFLOP/s sustained, "
             f"{g['bandwidth_gbps']:.3g} Gbit/s per rank, process baseline {gb(g['baseline_bytes'])}"
             + (" (CPU ranks: host memory is device memory)" if g["device_is_host"] else ""), ""]
    lines += parts_table(g) + [""]
    fit = [(i, c) for i, c in enumerate(configs) if c["fits"]]
    if fit:
        lines.append(f"configurations that fit ({len(fit)} of {len(configs)}), fastest first:")
        lines.append(f"    {'configuration':<50} {'per-rank peak':>13} {'step s':>9} {'compute':>8} {'comm':>8}")
        for i, c in fit[:SHOWN]:
            mark = "*" if i == rec else " "
            lines.append(f"  {mark} {name_of(c):<50} {gb(c['per_rank_peak_bytes']):>13} {c['step_time_s']:>9.3g} "
                         f"{c['compute_s']:>8.3g} {c['comm_s']:>8.3g}")
        lines += ["", why(configs, rec)]
    return "\n".join(lines)


def nothing_fits(cfg, plan: dict) -> str:
    """Plainly: nothing fits, the smallest it gets, and what would fit (more ranks, LoRA, a smaller block)."""
    from distclm import plan as pm
    from distclm.model import load_config

    g, configs = plan["given"], plan["configs"]
    least = min(configs, key=lambda c: c["per_rank_peak_bytes"])
    device = pm.Device(g["device_memory_bytes"], g["device_tflops"], g["bandwidth_gbps"], g["baseline_bytes"],
                       g["device_is_host"])
    out = [f"NOTHING FITS in {gb(g['device_memory_bytes'])} per rank (margin {g['margin']:.0%}): the smallest is "
           f"{name_of(least)} at {gb(least['per_rank_peak_bytes'])} (checkpointing and offload included). "
           f"What would fit:"]
    world, arch = g["world"], pm.arch_of(load_config(cfg.model.name, cfg.model.trust_remote_code), cfg.lora)
    for w in (world * 2 ** k for k in range(1, 13)):
        p = make_plan(_with(cfg, "train", global_batch_size=g["global_batch_size"] // world * w), w, device, arch)
        if p["recommended"] is not None:
            out.append(f"  - {w} ranks: {name_of(p['configs'][p['recommended']])} "
                       f"({gb(p['configs'][p['recommended']]['per_rank_peak_bytes'])})")
            break
    else:
        out.append(f"  - more ranks: not up to {world * 2 ** 12} (model states are not what is too big)")
    if not cfg.lora.r:
        p = make_plan(_with(cfg, "lora", r=8), world, device)
        out.append(_verdict("LoRA --lora.r=8", p))
    for block in (g["block_size"] // 2, g["block_size"] // 4):
        if block >= 2:
            p = make_plan(_with(_with(cfg, "data", block_size=block, dir=None), "train"), world, device, arch)
            out.append(_verdict(f"--data.block_size={block}", p))
    return "\n".join(out)


def _with(cfg, section: str, **changes):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def _verdict(label: str, p: dict) -> str:
    if p["recommended"] is None:
        least = min(c["per_rank_peak_bytes"] for c in p["configs"])
        return f"  - {label}: still not ({gb(least)} at the smallest)"
    c = p["configs"][p["recommended"]]
    return f"  - {label}: {name_of(c)} ({gb(c['per_rank_peak_bytes'])})"


def plan_command(inv) -> int:
    """`distclm plan`: the table, the pick (or what would fit), and the JSON with --plan.output."""
    cfg = inv.cfg
    if cfg.plan.output:
        check_writable(cfg.plan.output, "--plan.output", kind="file", beside=True)
    plan = make_plan(cfg)
    print(render(plan))
    if plan["recommended"] is None:
        print(nothing_fits(cfg, plan))
    if cfg.plan.output:
        with disk_full_is_one_line(f"--plan.output={cfg.plan.output}", Path(cfg.plan.output).parent,
                                   "the plan is printed above; no file was written"):
            atomic_write(Path(cfg.plan.output), (json.dumps(plan, indent=2) + "\n").encode())
        print(f"plan written to {cfg.plan.output}")
    return 0
