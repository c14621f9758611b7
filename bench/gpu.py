"""The GPU proof kit: one script, one GPU, under 8 minutes on an H100/H200-class GPU, to see distclm's GPU path work.

    python bench/gpu.py                 # on a machine with one CUDA GPU (the distclm:gpu image has everything)
    python bench/gpu.py --dry-run       # CPU, tiny sizes, fp32, a few steps: the plumbing (CI runs this)

What it measures, in this order, and writes to bench/out/gpu.json + bench/out/gpu.md:

  1. versions: torch, CUDA, NCCL, DeepSpeed, liger-kernel, transformers, the device and its peak bf16 TFLOP/s;
  2. the loss layer, in-process on distilgpt2-arch (random init) in bf16 at block 1024: tokens/s and MFU
     of the fused linear + cross-entropy of liger-kernel (when installed), distclm's own chunked one, and the
     model's own (logits materialised); step time from CUDA events around each step (the wall clock beside
     it: the gap is host overhead), peak device memory, and the first step's loss of each (they agree);
  3. attention with --train.doc_attention=within vs cross: which scaled-dot-product kernel runs (profiler op
     names: flash / memory-efficient / cuDNN / math), and its tokens/s;
  4. `distclm train` vs `transformers.Trainer` at block 128 on the same prepared blocks (bench/train.py's
     contestants: same model, micro-batch, steps; steps/s after warm-up);
  5. `distclm train` on one GPU with ddp, zero2 and zero3: the first 10 steps' losses agree within bf16
     tolerance, peak device memory of each (and distclm's predicted bytes where summary.json has them).

MFU = tokens/s x (6 N + 12 L H T) / peak FLOP/s (distclm.metrics, N = matmul parameters). `--dry-run` keeps
every path but sizes it for a CPU: gpt2-tiny, block 64, fp32, wall-clock timing, MFU n/a.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# Sizes: the real kit, and the dry run (CPU, seconds). `strategy_steps`: steps compared across strategies.
SIZES = {
    "gpu": dict(model="distilgpt2-arch", precision="bf16", block=1024, micro=8, steps=30, warmup=5,
                trainer_micro=32, trainer_steps=40, strategy_steps=10, tolerance=2e-2),
    "dry": dict(model="gpt2-tiny", precision="fp32", block=64, micro=2, steps=4, warmup=1,
                trainer_micro=4, trainer_steps=5, strategy_steps=3, tolerance=1e-4),
}
KERNELS = {  # profiler op name fragment -> the kernel scaled_dot_product_attention dispatched to
    "_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cuDNN", "_scaled_dot_product_attention_math": "math",
    "_flash_attention_forward": "flash", "_efficient_attention_forward": "memory-efficient",
}


def versions(device) -> dict:
    from importlib import metadata

    import torch

    from distclm.metrics import device_name, peak_tflops_for

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    nccl = torch.cuda.nccl.version() if cuda else None  # a tuple (2, 21, 5); an int in old torch
    nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
    name = device_name(device)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl, "deepspeed": version("deepspeed"),
            "liger_kernel": version("liger-kernel"), "transformers": version("transformers"),
            "distclm": version("distclm"), "device": name or "cpu", "peak_tflops": peak_tflops_for(name),
            "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None}


class StepClock:
    """Per-step time from CUDA events recorded on the stream around the step (GPU time, no host sync inside
    the step), and the host's wall clock beside it. On a CPU only the wall clock exists."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        self.pairs, self.walls = [], []

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.cuda:
            self.start, self.end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.start.record()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.pairs.append((self.start, self.end))
            self.torch.cuda.synchronize()
        self.walls.append(time.perf_counter() - self.t0)

    def seconds(self, warmup: int) -> tuple[float | None, float]:
        """(median CUDA-event seconds per step, median wall seconds per step) after `warmup` steps."""
        events = [s.elapsed_time(e) / 1e3 for s, e in self.pairs[warmup:]] if self.cuda else []
        return (statistics.median(events) if events else None), statistics.median(self.walls[warmup:])


def build(size: dict, device, loss_mode: str):
    """distilgpt2-arch (or the dry run's model) with distclm's loss routing: liger / chunked / own."""
    import torch

    import distclm.loss as loss
    from distclm.model import build_model

    model = build_model(size["model"], seed=0)
    dtype = torch.bfloat16 if size["precision"] == "bf16" else torch.float32
    model.to(device=device, dtype=dtype).train()
    liger = loss._liger
    if loss_mode == "chunked":
        loss._liger = lambda: None  # distclm's chunked loss even where liger-kernel is installed
    try:
        said = loss.install(model, enabled=loss_mode != "own")
    finally:
        loss._liger = liger
    return model, said


def batches(model, size: dict, device, n: int, doc_tokens: int = 200) -> tuple[list, int]:
    """n random (micro, block) batches with an EOS every ~doc_tokens tokens (packed documents)."""
    import torch

    cfg = model.config
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else cfg.vocab_size - 1
    g = torch.Generator().manual_seed(0)
    xs = []
    for _ in range(n):
        x = torch.randint(0, cfg.vocab_size - 1, (size["micro"], size["block"]), generator=g)
        x[torch.rand(x.shape, generator=g) < 1.0 / doc_tokens] = eos
        xs.append(x.to(device))
    return xs, eos


def train_steps(model, xs, eos, device, warmup: int) -> dict:
    """AdamW steps over xs (eos set: attention within documents): time, tokens/s, memory, first loss."""
    import torch

    from distclm.loss import mean_loss

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    clock, first = StepClock(device), None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for x in xs:
        with clock:
            loss = mean_loss(model, x, eos)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        first = float(loss) if first is None else first
    event_s, wall_s = clock.seconds(warmup)
    tokens = xs[0].numel()
    return {"step_ms_cuda_events": None if event_s is None else event_s * 1e3, "step_ms_wall": wall_s * 1e3,
            "tokens_per_s": tokens / (event_s or wall_s), "first_loss": first,
            "peak_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None}


def with_mfu(row: dict, model, size: dict, peak_tflops) -> dict:
    from distclm.metrics import flops_per_token, mfu
    from distclm.model import matmul_parameters

    text = model.config.get_text_config()
    width = text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    flops = flops_per_token(matmul_parameters(model), text.num_hidden_layers, width, size["block"])
    return {**row, "mfu": mfu(row["tokens_per_s"], flops, peak_tflops, 1)}


def loss_layers(size: dict, device, peak_tflops) -> list[dict]:
    """Section 2: the three loss layers, each on a fresh model with the same batches."""
    import torch

    rows = []
    for mode in ("liger", "chunked", "own"):
        if mode == "liger" and not _liger_usable(device):
            rows.append({"loss": mode, "skipped": "liger-kernel not installed or no CUDA"})
            continue
        model, said = build(size, device, mode)
        xs, _ = batches(model, size, device, size["steps"])
        row = with_mfu(train_steps(model, xs, None, device, size["warmup"]), model, size, peak_tflops)
        rows.append({"loss": mode, "path": said, **row})
        print(f"loss {mode}: {row['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
        del model, xs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _liger_usable(device) -> bool:
    import distclm.loss as loss

    return device.type == "cuda" and loss._liger() is not None


def attention(size: dict, device, peak_tflops) -> list[dict]:
    """Section 3: which SDPA kernel runs for cross and within attention (one profiled step each), tokens/s."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for mode in ("cross", "within"):
        model, _ = build(size, device, "chunked")
        xs, eos = batches(model, size, device, size["steps"])
        eos = eos if mode == "within" else None
        row = with_mfu(train_steps(model, xs, eos, device, size["warmup"]), model, size, peak_tflops)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            from distclm.loss import mean_loss

            mean_loss(model, xs[0], eos).backward()
        ops = sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower()})
        kernels = sorted({name for frag, name in KERNELS.items() if any(frag in op for op in ops)})
        rows.append({"attention": mode, "kernels": kernels, "ops": ops, **row})
        print(f"attention {mode}: {kernels}", file=sys.stderr, flush=True)
        del model, xs
    return rows


def prepared_blocks(work: Path, dry: bool) -> Path:
    """The embedded pydoc corpus at block 128 (bench/train.py's data), prepared once."""
    data = work / ("pydoc128-dry" if dry else "pydoc128")
    if not (data / "manifest.json").exists():
        from train import child_env

        cmd = [sys.executable, "-m", "distclm.cli", "prepare", "--data.source=pydoc", f"--data.dir={data}"]
        subprocess.run(cmd + (["--data.max_docs=200"] if dry else []), cwd=REPO, check=True, capture_output=True,
                       env=child_env())
    return data


def run_records(work: Path) -> tuple[dict[int, float], int | None, int | None]:
    """distclm's last run (bench/train.py keeps it in work/distclm-run): {step: loss}, peak and predicted bytes."""
    run = work / "distclm-run"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in recs if r["type"] == "train"}
    peak = max((r.get("mem_bytes") or 0 for r in recs if r["type"] == "train"), default=None)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    return losses, peak, (summary.get("memory") or {}).get("predicted_bytes")


def versus_trainer_and_strategies(size: dict, work: Path, dry: bool) -> tuple[dict, list[dict]]:
    """Sections 4 and 5: `distclm train` (ddp, zero2, zero3; one process) and transformers.Trainer at block 128.
    The ddp run is also the contestant against Trainer (same model, micro-batch, steps)."""
    from train import WARMUP, contestant, rate

    data, steps, micro = prepared_blocks(work, dry), size["trainer_steps"], size["trainer_micro"]
    rows, ref = [], None
    for strategy in ("ddp", "zero2", "zero3"):
        times, _, _ = contestant("distclm", data, size["model"], micro, steps, work,
                                 extra=[f"--train.strategy={strategy}"], precision=size["precision"])
        losses, peak, predicted = run_records(work)
        first = [losses[s] for s in range(1, size["strategy_steps"] + 1)]
        ref = first if ref is None else ref
        worst = max(abs(a - b) / abs(b) for a, b in zip(first, ref))
        rows.append({"strategy": strategy, "steps_per_s": rate(times, steps), "losses": first,
                     "max_rel_diff_vs_ddp": worst, "within_tolerance": worst <= size["tolerance"],
                     "peak_bytes": peak, "predicted_bytes": predicted})
        print(f"{strategy}: max rel diff vs ddp {worst:.2e}", file=sys.stderr, flush=True)
    times, _, _ = contestant("trainer", data, size["model"], micro, steps, work, precision=size["precision"])
    trainer = rate(times, steps)
    ddp = rows[0]["steps_per_s"]
    return ({"block": 128, "micro_batch": micro, "steps": steps, "warmup_steps": WARMUP, "distclm_steps_per_s": ddp,
             "trainer_steps_per_s": trainer, "ratio": ddp / trainer}, rows)


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _mb(v) -> str:
    return "n/a" if v is None else f"{v / 2**20:.0f} MB"


def markdown(res: dict) -> str:
    v, size = res["versions"], res["size"]
    lines = [f"# distclm GPU kit: {v['device']} ({res['date']}{', DRY RUN on CPU' if res['dry_run'] else ''})", "",
             "torch {torch}, CUDA {cuda}, NCCL {nccl}, DeepSpeed {deepspeed}, liger-kernel {liger_kernel}, "
             "transformers {transformers}, distclm {distclm}; peak {peak_tflops} TFLOP/s".format(**v), "",
             f"## Loss layer: {size['model']}, {size['precision']}, block {size['block']}, micro-batch "
             f"{size['micro']}, {size['steps']} steps ({size['warmup']} warm-up)", "",
             "| loss | tokens/s | MFU | step ms (CUDA events) | step ms (wall) | peak memory | first loss |",
             "|---|---|---|---|---|---|---|"]
    for r in res["loss_layers"]:
        if "skipped" in r:
            lines.append(f"| {r['loss']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['loss']} | {r['tokens_per_s']:.0f} | {_num(r['mfu'], '.1%')} | "
                     f"{_num(r['step_ms_cuda_events'], '.1f')} | {r['step_ms_wall']:.1f} | {_mb(r['peak_bytes'])} | "
                     f"{r['first_loss']:.4f} |")
    lines += ["", "## Attention (chunked loss)", "", "| doc attention | SDPA kernel | tokens/s | MFU |", "|---|---|---|---|"]
    lines += [f"| {r['attention']} | {', '.join(r['kernels']) or 'none seen: ' + ', '.join(r['ops'])} | "
              f"{r['tokens_per_s']:.0f} | {_num(r['mfu'], '.1%')} |" for r in res["attention"]]
    t = res["trainer"]
    lines += ["", f"## distclm train vs transformers.Trainer: block 128, micro-batch {t['micro_batch']}, "
              f"{t['steps']} steps", "", f"distclm {t['distclm_steps_per_s']:.2f} steps/s, Trainer "
              f"{t['trainer_steps_per_s']:.2f} steps/s: **{t['ratio']:.2f}x**", "",
              f"## One GPU: ddp vs zero2 vs zero3 (first {size['strategy_steps']} steps, tolerance "
              f"{size['tolerance']:g} relative)", "",
              "| strategy | steps/s | max rel. loss diff vs ddp | within tolerance | peak memory | predicted |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {r['steps_per_s']:.2f} | {r['max_rel_diff_vs_ddp']:.2e} | {r['within_tolerance']} | "
              f"{_mb(r['peak_bytes'])} | {_mb(r['predicted_bytes'])} |" for r in res["strategies"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, fp32: the plumbing only")
    ap.add_argument("--out", default=str(OUT), help="folder of gpu.json and gpu.md (default bench/out)")
    args = ap.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here (use --dry-run for the CPU plumbing check)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if not args.dry_run else "cpu")
    size = SIZES["dry" if args.dry_run else "gpu"]
    out = Path(args.out)
    work = out / "gpu-work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    v = versions(device)
    res = {"date": time.strftime("%Y-%m-%d"), "dry_run": args.dry_run, "size": size, "versions": v,
           "loss_layers": loss_layers(size, device, v["peak_tflops"]),
           "attention": attention(size, device, v["peak_tflops"])}
    res["trainer"], res["strategies"] = versus_trainer_and_strategies(size, work, args.dry_run)
    res["seconds"] = time.monotonic() - t0
    (out / "gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "gpu.md").write_text(markdown(res))
    print(markdown(res))
    ok = all(r["within_tolerance"] for r in res["strategies"])
    print(f"bench/gpu.py: {res['seconds']:.0f} s; strategies agree: {ok}; wrote {out / 'gpu.json'}, {out / 'gpu.md'}",
          file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
