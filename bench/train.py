"""Side-by-side training speed: distclm vs transformers.Trainer (the tutorial's arguments) vs a bare loop.

    python bench/train.py [--steps N] [--repeats R] [--model gpt2-tiny]

Same model (random init from the same config), same prepared blocks (the embedded pydoc corpus,
block 128), same batch (8 x 128), fp32 on CPU, one process each, run one after another and
alternated over --repeats rounds. Each contestant runs in a fresh child process that records the
wall-clock time at the end of every optimizer step:

  distclm   `distclm train` (DDP strategy on one process, fused AdamW, the real CLI and loop)
  trainer   `transformers.Trainer`, the tutorial's TrainingArguments (lr 2e-5, weight decay 0.01,
            batch 8), evaluation and saving off for the timed steps
  bare      a plain PyTorch loop with `torch.optim.AdamW(fused=True)`: the floor of framework overhead

steps/s = (N - W) / (t_N - t_W) over the steps after W warm-up steps; startup = process start to the
end of the first step. Medians over rounds; ratios against Trainer and the bare loop. The table is
printed and written to bench/out/train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
WARMUP = 3


def child_trainer(data: str, steps: int, model_name: str, times_out: str) -> None:
    import torch
    from hf_blocks import trainer_dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from distclm.data.blocks import BlockReader
    from distclm.model import build_model

    dataset = trainer_dataset(BlockReader(data).split("train"))

    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.time())

    torch.manual_seed(0)
    model = build_model(model_name, seed=0)
    args = TrainingArguments(output_dir=str(Path(times_out).parent / "trainer-out"), learning_rate=2e-5,
                             weight_decay=0.01, per_device_train_batch_size=8, max_steps=steps,
                             eval_strategy="no", save_strategy="no", report_to=[], logging_steps=10**9,
                             dataloader_num_workers=0, use_cpu=True, seed=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
            callbacks=[Clock()]).train()
    Path(times_out).write_text(json.dumps(times))


def child_bare(data: str, steps: int, model_name: str, times_out: str) -> None:
    import numpy as np
    import torch

    from distclm.data.blocks import BlockReader
    from distclm.model import build_model

    blocks = BlockReader(data).split("train")
    torch.manual_seed(0)
    model = build_model(model_name, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, fused=True)
    perm = np.random.default_rng(0).permutation(len(blocks))
    times = []
    for step in range(steps):
        x = torch.from_numpy(blocks.batch(perm[step * 8:(step + 1) * 8]).astype(np.int64))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.time())
    Path(times_out).write_text(json.dumps(times))


def run_distclm(data: Path, steps: int, model_name: str, work: Path) -> list[float]:
    """`distclm train` as a user runs it; step end times from metrics.jsonl ("time": unix time at the step's end)."""
    run_dir = work / "distclm-run"
    cmd = [sys.executable, "-m", "distclm.cli", "train", f"--data.dir={data}", f"--model.name={model_name}",
           f"--run.dir={run_dir}", "--run.resume=none", "--run.overwrite=true", f"--train.max_steps={steps}",
           "--train.lr=2e-5", "--train.micro_batch_size=8", "--log.every_steps=1", "--log.interval_s=1000",
           "--eval.split=none-for-bench"]
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    t_start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=child_env())
    if proc.returncode != 0:
        raise SystemExit(f"distclm train failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["type"] == "train"]
    return [t_start] + [r["time"] for r in recs]


def run_child(kind: str, data: Path, steps: int, model_name: str, work: Path) -> list[float]:
    out = work / f"{kind}-times.json"
    t_start = time.time()
    proc = subprocess.run([sys.executable, __file__, f"--child={kind}", f"--data={data}", f"--steps={steps}",
                           f"--model={model_name}", f"--times-out={out}"], cwd=REPO, capture_output=True,
                          text=True, env=child_env())
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return [t_start] + json.loads(out.read_text())


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # each contestant uses the machine's default threads
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def rates(times: list[float], steps: int) -> tuple[float, float]:
    """(steps/s after warm-up, startup seconds) from [process start, end of step 1, ..., end of step N]."""
    t0, ends = times[0], times[1:]
    assert len(ends) == steps, (len(ends), steps)
    return (steps - WARMUP) / (ends[-1] - ends[WARMUP - 1]), ends[0] - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="gpt2-tiny")
    ap.add_argument("--child", choices=["trainer", "bare"])
    ap.add_argument("--data")
    ap.add_argument("--times-out")
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        {"trainer": child_trainer, "bare": child_bare}[args.child](args.data, args.steps, args.model, args.times_out)
        return
    work = OUT / "train-work"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pydoc128"
    subprocess.run([sys.executable, "-m", "distclm.cli", "prepare", "--data.source=pydoc", f"--data.dir={data}"],
                   cwd=REPO, check=True, capture_output=True, env=child_env())
    results: dict[str, list[tuple[float, float]]] = {"distclm": [], "trainer": [], "bare": []}
    for r in range(args.repeats):
        for kind in ("trainer", "bare", "distclm") if r % 2 == 0 else ("distclm", "bare", "trainer"):
            times = run_distclm(data, args.steps, args.model, work) if kind == "distclm" else \
                run_child(kind, data, args.steps, args.model, work)
            results[kind].append(rates(times, args.steps))
            print(f"round {r + 1} {kind:8s} {results[kind][-1][0]:.3f} steps/s, startup {results[kind][-1][1]:.1f}s",
                  flush=True)
    med = {k: (statistics.median(v[0] for v in rs), statistics.median(v[1] for v in rs)) for k, rs in results.items()}
    lines = [f"Training speed, {args.model}, batch 8 x 128, fp32, 1 CPU process, {args.steps} steps "
             f"(first {WARMUP} excluded), median of {args.repeats} alternating rounds, {os.cpu_count()} cores.", "",
             "| contestant | steps/s | startup to first step (s) | steps/s vs Trainer | steps/s vs bare loop |",
             "|---|---|---|---|---|"]
    for k in ("distclm", "trainer", "bare"):
        lines.append(f"| {k} | {med[k][0]:.3f} | {med[k][1]:.1f} | {med[k][0] / med['trainer'][0]:.2f}x | "
                     f"{med[k][0] / med['bare'][0]:.2f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    (OUT / "train.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
