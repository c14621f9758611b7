"""Per-rank peak resident memory of ddp, zero2 and zero3: does ZeRO really shard?

    python bench/memory.py [--models gpt2-24x1024,llama-24x1024] [--quick]

Models are built from config with random init and saved as Hugging Face folders (what a user trains from):
a GPT-2 of 24 layers x 1024 (354 M parameters) and a Llama-shaped model of similar size (24 x 1024, SwiGLU
2304, untied embeddings: 373 M). Each run is a real `distclm train` under torchrun on CPU (gloo): micro-batch 1,
block 128, 3 optimizer steps, one checkpoint at the end and the export (both included), eval on 1 block.
Every worker's resident memory is sampled every 0.1 s over its whole life; the table shows the largest per-rank
peak of each run and its ratio to ddp's. `--quick`: a 4-layer GPT-2 (plumbing check, numbers meaningless).
Writes bench/out/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
MODELS = {
    "gpt2-24x1024": ("gpt2", dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024)),
    "llama-24x1024": ("llama", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    num_key_value_heads=16, intermediate_size=2304, max_position_embeddings=1024,
                                    tie_word_embeddings=False)),
    "gpt2-4x256": ("gpt2", dict(n_layer=4, n_embd=256, n_head=4, n_positions=1024)),
}
RUNS = [("ddp", 2), ("zero2", 2), ("zero3", 2), ("zero3", 4)]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e["HF_HUB_OFFLINE"] = "1"
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(name: str, work: Path) -> Path:
    folder = work / "models" / name
    if (folder / "config.json").exists():
        return folder
    code = ("import sys, torch; from transformers import AutoConfig, AutoModelForCausalLM; "
            "from distclm.data.tokenize import load_hf_tokenizer; "
            f"t, kw = {MODELS[name]!r}; torch.manual_seed(0); "
            "m = AutoModelForCausalLM.from_config(AutoConfig.for_model(t, vocab_size=50257, **kw)); "
            "m.save_pretrained(sys.argv[1]); load_hf_tokenizer('gpt2')[0].save_pretrained(sys.argv[1]); "
            "print(sum(p.numel() for p in m.parameters()))")
    n = subprocess.run([sys.executable, "-c", code, str(folder)], env=env(), check=True, capture_output=True,
                       text=True).stdout.strip().splitlines()[-1]  # (DeepSpeed may log to stdout first)
    print(f"built {name}: {int(n):,} parameters", file=sys.stderr)
    return folder


def prepare(work: Path) -> Path:
    data = work / "data"
    subprocess.run([sys.executable, "-m", "distclm.cli", "prepare", "--data.source=pydoc", f"--data.dir={data}",
                    "--data.block_size=128", "--data.val_fraction=0.1"], env=env(), check=True, capture_output=True)
    return data


def sample(root: psutil.Process, peaks: dict, stop: threading.Event) -> None:
    """Peak RSS of every distclm worker under `root`, by pid, every 0.1 s."""
    while not stop.is_set():
        try:
            procs = root.children(recursive=True)
        except psutil.Error:
            break
        for p in procs:
            try:
                if "distclm.cli" in " ".join(p.cmdline()):
                    peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
            except psutil.Error:
                pass
        stop.wait(0.1)


def run(model: Path, data: Path, strategy: str, nproc: int, work: Path, extra: tuple = ()) -> dict:
    """One training run; `extra`: more flags (later ones win, e.g. another --train.micro_batch_size)."""
    run_dir = work / "runs" / f"{model.name}-{strategy}-{nproc}-{len(extra)}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "distclm.cli", "train", f"--data.dir={data}",
           f"--model.name={model}", f"--run.dir={run_dir}", f"--train.strategy={strategy}", "--train.max_steps=3",
           "--train.micro_batch_size=1", "--eval.max_blocks=1", "--log.every_steps=1", "--run.overwrite=true",
           "--run.resume=none", "--train.dist_timeout_s=3600", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks, stop = {}, threading.Event()
    watcher = threading.Thread(target=sample, args=(psutil.Process(proc.pid), peaks, stop), daemon=True)
    watcher.start()
    out, err = proc.communicate()
    stop.set()
    watcher.join()
    shutil.rmtree(run_dir, ignore_errors=True)  # GBs of checkpoint per run: keep the disk free for the next one
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} x{nproc} failed:\n{err[-4000:]}")
    return {"strategy": strategy, "nproc": nproc, "peak_per_rank": max(peaks.values()), "ranks": len(peaks),
            "wall_s": time.perf_counter() - t0}


def table(results: dict) -> str:
    lines = ["| model | strategy | processes | per-rank peak RSS (max over ranks) | vs ddp |", "|---|---|---|---|---|"]
    for model, rows in results.items():
        ddp = next(r["peak_per_rank"] for r in rows if r["strategy"] == "ddp")
        for r in rows:
            lines.append(f"| {model} | {r['strategy']} | {r['nproc']} | {r['peak_per_rank'] / 2**30:.2f} GiB | "
                         f"{r['peak_per_rank'] / ddp:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-24x1024,llama-24x1024")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", default=",".join(f"{s}:{n}" for s, n in RUNS), help="strategy:processes, comma list")
    args = ap.parse_args()
    names = ["gpt2-4x256"] if args.quick else args.models.split(",")
    work = OUT / "memory"
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(work)
    results = {}
    for name in names:
        model = build_model(name, work)
        results[name] = []
        for strategy, nproc in ((r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(",")):
            r = run(model, data, strategy, nproc, work)
            print(json.dumps({"model": name, **r}), file=sys.stderr, flush=True)
            results[name].append(r)
    text = (f"Per-rank peak RSS, 3 steps at micro-batch 1 (block 128), a checkpoint and the export included; "
            f"CPU, gloo, {os.cpu_count()} cores.\n\n" + table(results) + "\n")
    (OUT / "memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
