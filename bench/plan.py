"""Predicted (`distclm plan`) against measured per-rank peak memory, side by side, on CPU ranks.

    python bench/plan.py [--models gpt2-tiny,llama-tiny,gpt2-24x1024@1,llama-24x1024@1] [--runs ddp:2,zero2:2,zero3:2]
                         [--micros 1,32]          (MODEL@1,8: that model at those micro-batch sizes only)
    python bench/plan.py --big                    (the docs/plan.md table: 7B Llama and Mixtral, no runs)

The runs are bench/memory.py's (a real `distclm train` under torchrun, gloo, block 128, 3 optimizer steps, a
checkpoint and the export included, every worker's resident memory sampled every 0.1 s): its models (HF folders
built from config) or the presets by name, at each micro-batch size. The prediction is the plan's per-rank peak
for exactly that configuration on this machine (`distclm.plan_cli.predicted_bytes`, the same number a run
writes to summary.json). Targets: within 15% on models of 300 M parameters and more, 25% on the tiny presets.
Writes bench/out/plan.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import memory  # noqa: E402 - the runs, models and data of bench/memory.py
from distclm.config import build_config  # noqa: E402
from distclm.plan_cli import predicted_bytes  # noqa: E402

GiB = 2**30


def predict(model: str, strategy: str, nproc: int, micro: int) -> int:
    cfg = build_config(flags={"model.name": model, "train.strategy": strategy, "train.micro_batch_size": micro,
                              "data.block_size": 128})
    return predicted_bytes(cfg, nproc, 128)


def row(name: str, model_arg: Path, data: Path, work: Path, strategy: str, nproc: int, micro: int) -> dict:
    measured = memory.run(model_arg, data, strategy, nproc, work, (f"--train.micro_batch_size={micro}",))
    predicted = predict(str(model_arg), strategy, nproc, micro)
    r = {"model": name, "strategy": strategy, "nproc": nproc, "micro": micro, "predicted": predicted,
         "measured": measured["peak_per_rank"]}
    print(f"{name} {strategy} x{nproc} micro {micro}: predicted {predicted / GiB:.2f} GiB, measured "
          f"{r['measured'] / GiB:.2f} GiB, ratio {predicted / r['measured']:.2f}", file=sys.stderr, flush=True)
    return r


def table(rows: list[dict]) -> str:
    lines = ["| model | strategy | processes | micro | predicted per-rank peak | measured | predicted / measured |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['strategy']} | {r['nproc']} | {r['micro']} | {r['predicted'] / GiB:.2f} GiB "
                     f"| {r['measured'] / GiB:.2f} GiB | {r['predicted'] / r['measured']:.2f} |")
    return "\n".join(lines)


# The docs table (docs/plan.md): configurations built in code, no download; the assumptions are printed with it.
BIG = {
    "llama-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                               tie_word_embeddings=False)),
    "mixtral-8x7b": ("mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768)),
}
DEVICES = {"H100 80GB": 80e9, "H200 141GB": 141e9}
BIG_GLOBAL = 4096  # sequences of 4096 tokens per optimizer step (16.8 M tokens) on every world size
BIG_ASSUMPTIONS = ("bf16, block 4096, global batch 4096 sequences (16.8 M tokens) at every world size, fused loss, "
                   "400 TFLOP/s sustained per GPU (40% of 989 bf16 peak), 400 Gbit/s per GPU for collectives "
                   "(one 400G NIC per GPU across nodes), 1 GiB of CUDA context and NCCL per GPU, 10% margin; "
                   "communication not overlapped with compute (an upper bound)")


def big_table() -> str:
    from transformers import AutoConfig

    from distclm import plan as pm
    from distclm.config import Config
    from distclm.plan_cli import make_plan

    lines = ["| model | device | ranks | " + " | ".join(f"{s}: GB/rank, s/step, comm share, micro" for s in
                                                       ("ddp", "zero1", "zero2", "zero3")) + " | recommended |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (kind, kw) in BIG.items():
        arch = pm.arch_of(AutoConfig.for_model(kind, **kw))
        for dev_name, memory_bytes in DEVICES.items():
            device = pm.Device(int(memory_bytes), 400.0, 400.0, GiB, False)
            for world in (64, 512, 4096):
                cfg = Config()
                cfg.model.name, cfg.data.block_size, cfg.train.precision = name, 4096, "bf16"
                cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, BIG_GLOBAL
                plan = make_plan(cfg, world, device, arch)
                cells = [_best(plan["configs"], s) for s in ("ddp", "zero1", "zero2", "zero3")]
                rec = plan["configs"][plan["recommended"]] if plan["recommended"] is not None else None
                pick = "nothing fits" if rec is None else (
                    f"{rec['strategy']}{'' if rec['offload'] == 'none' else '+' + rec['offload']} micro "
                    f"{rec['micro_batch_size']}{' ckpt' if rec['activation_checkpointing'] else ''}")
                lines.append(f"| {name} | {dev_name} | {world} | " + " | ".join(cells) + f" | {pick} |")
    return f"Assumptions: {BIG_ASSUMPTIONS}.\n\n" + "\n".join(lines) + "\n"


def _best(configs: list[dict], strategy: str) -> str:
    """The fastest fitting configuration of `strategy` without offload: GB per rank, s per step, comm share."""
    fit = [c for c in configs if c["strategy"] == strategy and c["offload"] == "none" and c["fits"]]
    if not fit:
        return "does not fit"
    c = fit[0]
    return (f"{c['per_rank_peak_bytes'] / 1e9:.0f}, {c['step_time_s']:.3g}, {c['comm_s'] / c['step_time_s']:.0%}, "
            f"{c['micro_batch_size']}{' ckpt' if c['activation_checkpointing'] else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-tiny,llama-tiny,gpt2-24x1024@1,llama-24x1024@1")
    ap.add_argument("--runs", default="ddp:2,zero2:2,zero3:2", help="strategy:processes, comma list")
    ap.add_argument("--micros", default="1,32", help="micro-batch sizes, comma list")
    ap.add_argument("--big", action="store_true", help="print the docs table (7B Llama, Mixtral; no runs)")
    args = ap.parse_args()
    if args.big:
        print(big_table())
        return
    work = memory.OUT / "plan"
    work.mkdir(parents=True, exist_ok=True)
    data = memory.prepare(work)
    rows = []
    for spec_model in args.models.split(","):
        name, _, own = spec_model.partition("@")  # gpt2-24x1024@1: this model at micro 1 only
        model_arg = memory.build_model(name, work) if name in memory.MODELS else Path(name)
        for spec in args.runs.split(","):
            strategy, nproc = spec.split(":")[0], int(spec.split(":")[1])
            for micro in (int(m) for m in (own or args.micros).split(",")):
                rows.append(row(name, model_arg, data, work, strategy, nproc, micro))
    text = (f"Predicted (distclm plan) vs measured per-rank peak RSS: 3 steps, block 128, a checkpoint and the export "
            f"included; CPU, gloo, {os.cpu_count()} cores.\n\n" + table(rows) + "\n")
    (memory.OUT / "plan.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
