"""Side-by-side training speed and memory: distclm (fused loss, and without it) vs transformers.Trainer (the
tutorial's arguments) vs a bare PyTorch loop; the cost of distclm's own features; the largest micro-batch
that fits a memory cap.

    python bench/train.py [--models gpt2-tiny,gpt2-6x256] [--micro 8,32] [--steps N] [--repeats R]
    python bench/train.py --ablations        # per-step cost of rank timing, dropout seeding, doc attention
    python bench/train.py --headroom 1500    # the largest micro-batch under a 1500 MB RSS cap, fused or not

Same model (random init from the same config), same prepared blocks (the embedded pydoc corpus, block 128),
fp32 on CPU, one process each, contestants alternated over --repeats rounds, each in a fresh child process
that records the wall-clock time at the end of every optimizer step:

  distclm          `distclm train` (one process, fused AdamW, the fused linear + cross-entropy: the default)
  distclm-unfused  the same with --train.fused_loss=false (the model's own loss: logits materialised)
  trainer          `transformers.Trainer`, the tutorial's TrainingArguments, evaluation and saving off
  bare             a plain PyTorch loop, `model(labels=x).loss`, `torch.optim.AdamW(fused=True)`

steps/s = (N - W) / (t_N - t_W) after W warm-up steps; peak RSS of the whole child process (sampled every
0.05 s). Medians over rounds. Tables are printed and written to bench/out/train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
WARMUP = 3
FOLDERS = {"gpt2-6x256": dict(n_layer=6, n_embd=256, n_head=4, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
                              attn_pdrop=0.0)}
# distclm with one of its per-step features switched off from the outside (the bench patches, not a flag)
ABLATE = {
    "no-rank-times": "import distclm.loop as l; l.rank_times = lambda loop: {}",
    "no-dropout-seeding": "import distclm.loop as l; l.micro_seed = lambda *a: 0; import torch; "
                          "torch.manual_seed = lambda s: None",
}


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # each contestant uses the machine's default threads
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def model_arg(name: str, work: Path) -> str:
    """A preset name, or a folder built from config (random init) for the others."""
    if name not in FOLDERS:
        return name
    folder = work / name
    if not (folder / "config.json").exists():
        code = ("import sys, torch; from transformers import GPT2Config, GPT2LMHeadModel; torch.manual_seed(0); "
                f"GPT2LMHeadModel(GPT2Config(**{FOLDERS[name]!r})).save_pretrained(sys.argv[1]); "
                "from distclm.data.tokenize import load_hf_tokenizer; "
                "load_hf_tokenizer('gpt2')[0].save_pretrained(sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, str(folder)], check=True, env=child_env(), capture_output=True)
    return str(folder)


def child_trainer(data: str, steps: int, model: str, micro: int, out: str, precision: str = "fp32") -> None:
    import torch
    from hf_blocks import trainer_dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from distclm.data.blocks import BlockReader
    from distclm.model import build_model

    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.time())

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(Path(out).parent / "trainer-out"), learning_rate=2e-5,
                             weight_decay=0.01, per_device_train_batch_size=int(micro), max_steps=int(steps),
                             eval_strategy="no", save_strategy="no", report_to=[], logging_steps=10**9,
                             dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=0,
                             disable_tqdm=True, bf16=precision == "bf16")  # bf16: autocast, as distclm's
    Trainer(model=build_model(model, seed=0), args=args, train_dataset=trainer_dataset(BlockReader(data).split("train")),
            data_collator=default_data_collator, callbacks=[Clock()]).train()
    Path(out).write_text(json.dumps(times))


def child_bare(data: str, steps: int, model: str, micro: int, out: str) -> None:
    import numpy as np
    import torch

    from distclm.data.blocks import BlockReader
    from distclm.model import build_model

    blocks = BlockReader(data).split("train")
    model = build_model(model, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, fused=True)
    perm = np.random.default_rng(0).permutation(len(blocks))
    times = []
    for step in range(steps):
        x = torch.from_numpy(blocks.batch(perm[step * micro:(step + 1) * micro]).astype(np.int64))
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time())
    Path(out).write_text(json.dumps(times))


def watch(proc: subprocess.Popen, cap_bytes: int | None, peak: list) -> None:
    """Peak RSS of `proc` (and its children), every 0.05 s; kill it past `cap_bytes`."""
    try:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            rss = sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
            peak[0] = max(peak[0], rss)
            if cap_bytes and rss > cap_bytes:
                proc.kill()
                peak.append("killed")
            time.sleep(0.05)
    except psutil.Error:
        pass


def run(cmd: list[str], work: Path, cap_bytes: int | None = None) -> tuple[float, int, bool]:
    """Start `cmd`, time it, sample its memory -> (start time, peak RSS, finished within the cap)."""
    t0, peak = time.time(), [0]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    watcher = threading.Thread(target=watch, args=(proc, cap_bytes, peak), daemon=True)
    watcher.start()
    err = proc.communicate()[1]
    watcher.join()
    if proc.returncode != 0 and "killed" not in peak:
        raise SystemExit(f"{cmd[:6]} failed:\n{err[-3000:]}")
    return t0, peak[0], proc.returncode == 0


def contestant(kind: str, data: Path, model: str, micro: int, steps: int, work: Path, cap=None, extra=(),
               precision: str = "fp32"):
    """-> (times: [start, end of step 1, ...], peak RSS, finished). distclm's run stays in work/distclm-run."""
    if kind.startswith("distclm"):
        run_dir = work / "distclm-run"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        flags = ["train", f"--data.dir={data}", f"--model.name={model}", f"--run.dir={run_dir}",
                 f"--train.max_steps={steps}", "--train.lr=2e-5", f"--train.micro_batch_size={micro}",
                 "--log.every_steps=1", "--log.interval_s=1000", "--eval.split=none-for-bench", "--run.resume=none",
                 f"--train.precision={precision}",
                 *(["--train.fused_loss=false"] if kind == "distclm-unfused" else []), *extra]
        patch = ABLATE.get(kind.removeprefix("distclm-"), "")
        code = f"{patch}\nimport sys; from distclm.cli import main; sys.exit(main(sys.argv[1:]))"
        t0, peak, ok = run([sys.executable, "-c", code, *flags], work, cap)
        if not ok:
            return None, peak, False
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [t0] + [r["time"] for r in recs if r["type"] == "train"], peak, True
    out = work / f"{kind}-times.json"
    t0, peak, ok = run([sys.executable, __file__, f"--child={kind}", f"--data={data}", f"--steps={steps}",
                        f"--model={model}", f"--micro={micro}", f"--times-out={out}", f"--precision={precision}"],
                       work, cap)
    return ([t0] + json.loads(out.read_text()) if ok else None), peak, ok


def rate(times: list[float], steps: int) -> float:
    ends = times[1:]
    assert len(ends) == steps, (len(ends), steps)
    return (steps - WARMUP) / (ends[-1] - ends[WARMUP - 1])


def compare(kinds, configs, data, steps, repeats, work, extra=lambda kind: ()) -> dict:
    """{(model, micro): {kind: (median steps/s, median peak RSS)}}, kinds alternated round by round."""
    out = {}
    for model, micro in configs:
        got = {k: [] for k in kinds}
        for r in range(repeats):
            for kind in (kinds if r % 2 == 0 else list(reversed(kinds))):
                times, peak, _ = contestant(kind, data, model_arg(model, work), micro, steps, work,
                                            extra=extra(kind))
                got[kind].append((rate(times, steps), peak))
                print(f"{model} micro {micro} round {r + 1} {kind:22s} {got[kind][-1][0]:.3f} steps/s "
                      f"{peak / 2**20:.0f} MB", file=sys.stderr, flush=True)
        out[(model, micro)] = {k: (statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs))
                               for k, vs in got.items()}
    return out


def speed_table(res: dict) -> str:
    lines = ["| model | micro-batch | contestant | steps/s | vs Trainer | vs bare loop | peak RSS | RSS vs Trainer |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, micro), row in res.items():
        tr, bare = row["trainer"], row["bare"]
        for kind, (sps, rss) in row.items():
            lines.append(f"| {model} | {micro} | {kind} | {sps:.3f} | {sps / tr[0]:.2f}x | {sps / bare[0]:.2f}x | "
                         f"{rss / 2**20:.0f} MB | {rss / tr[1]:.2f}x |")
    return "\n".join(lines)


def headroom(cap_mb: int, data: Path, work: Path, model: str) -> str:
    """The largest micro-batch (8, 16, 32, ...) whose 4-step run stays under `cap_mb` of RSS, fused or not."""
    lines = [f"| loss | largest micro-batch under {cap_mb} MB RSS ({model}, block 128) |", "|---|---|"]
    for kind in ("distclm", "distclm-unfused"):
        best, micro = None, 8
        while micro <= 1024:
            _, peak, ok = contestant(kind, data, model_arg(model, work), micro, 4, work, cap=cap_mb * 2**20)
            print(f"headroom {kind} micro {micro}: {'ok' if ok else 'over the cap'} ({peak / 2**20:.0f} MB)",
                  file=sys.stderr, flush=True)
            if not ok:
                break
            best, micro = micro, micro * 2
        label = "fused (default)" if kind == "distclm" else "the model's own (--train.fused_loss=false)"
        lines.append(f"| {label} | {best} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-tiny,gpt2-6x256")
    ap.add_argument("--micro", default="8,32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--headroom", type=int, metavar="CAP_MB")
    ap.add_argument("--child", choices=["trainer", "bare"])
    ap.add_argument("--data")
    ap.add_argument("--model")
    ap.add_argument("--times-out")
    ap.add_argument("--precision", default="fp32", help="children only: fp32, or bf16 (bench/gpu.py)")
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        if args.child == "trainer":
            child_trainer(args.data, args.steps, args.model, int(args.micro), args.times_out, args.precision)
        else:
            child_bare(args.data, args.steps, args.model, int(args.micro), args.times_out)
        return
    work = OUT / "train-work"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "pydoc128"
    subprocess.run([sys.executable, "-m", "distclm.cli", "prepare", "--data.source=pydoc", f"--data.dir={data}"],
                   cwd=REPO, check=True, capture_output=True, env=child_env())
    head = (f"fp32, 1 CPU process ({os.cpu_count()} cores), block 128, {args.steps} steps (first {WARMUP} excluded), "
            f"median of {args.repeats} alternating rounds.\n\n")
    if args.headroom:  # one 4-step run per micro-batch, no rounds
        text = (f"fp32, 1 CPU process ({os.cpu_count()} cores), block 128, 4 steps a run.\n\n"
                + headroom(args.headroom, data, work, args.models.split(",")[0]))
    elif args.ablations:
        kinds = ["distclm", "distclm-no-rank-times", "distclm-no-dropout-seeding", "distclm-within"]
        res = compare(kinds, [(m, int(x)) for m in args.models.split(",") for x in args.micro.split(",")], data,
                      args.steps, args.repeats, work,
                      extra=lambda k: ["--train.doc_attention=within"] if k == "distclm-within" else [])
        lines = ["| model | micro-batch | variant | steps/s | vs distclm |", "|---|---|---|---|---|"]
        for (model, micro), row in res.items():
            lines += [f"| {model} | {micro} | {k} | {v[0]:.3f} | {v[0] / row['distclm'][0]:.3f}x |"
                      for k, v in row.items()]
        text = head + "\n".join(lines)
    else:
        configs = [(m, int(x)) for m in args.models.split(",") for x in args.micro.split(",")]
        text = head + speed_table(compare(["distclm", "distclm-unfused", "trainer", "bare"], configs, data,
                                          args.steps, args.repeats, work))
    print(text)
    name = "train-headroom.md" if args.headroom else "train-ablations.md" if args.ablations else "train.md"
    (OUT / name).write_text(text + "\n")


if __name__ == "__main__":
    main()
