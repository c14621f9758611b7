"""Resume cost does not grow with the position in the epoch (O(1) resume: no replay of batches).

    python bench/resume.py [--repeats R]

A prepared folder large enough for 10,000+ steps in one epoch (the pydoc corpus repeated, block 128,
~88k train blocks; global batch 8), a real checkpoint written at step 10, and the same checkpoint
relabelled as step 10,000 of the epoch (meta.json and the schedule's step count: what a run that
had trained 10,000 steps would hold). `distclm train --run.resume=CKPT` is timed from process start
to the end of the first step after the resume, for both, alternated over --repeats rounds.
Writes bench/out/resume.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
TOTAL = 10_020


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def distclm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "distclm.cli", *args], cwd=REPO, env=env(), capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"distclm {args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc


def build_data(work: Path) -> Path:
    from pydoc_data.topics import topics

    corpus = work / "pydoc-x80.jsonl"
    if not corpus.exists():
        with open(corpus, "w", encoding="utf-8") as fh:
            for copy in range(80):
                for name in sorted(topics):
                    fh.write(json.dumps({"text": topics[name], "copy": copy}) + "\n")
    data = work / "data"
    distclm("prepare", f"--data.source={corpus}", f"--data.dir={data}", "--data.val_fraction=0.01")
    return data


def common(data: Path, run_dir: Path) -> list[str]:
    return [f"--data.dir={data}", "--model.name=gpt2-tiny", f"--run.dir={run_dir}", "--train.micro_batch_size=8",
            f"--train.max_steps={TOTAL}", "--log.every_steps=1", "--log.interval_s=1000", "--eval.split=none"]


def make_checkpoints(data: Path, work: Path) -> dict[int, Path]:
    src = work / "src"
    if src.exists():
        shutil.rmtree(src)
    # Train 10 steps of the 10,020-step schedule, checkpoint, and stop there with SIGTERM.
    proc = subprocess.Popen([sys.executable, "-m", "distclm.cli", "train", *common(data, src), "--train.save_every=10"],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck10 = src / "checkpoints" / "step-10"
    while not (ck10 / "COMPLETE").exists():
        if proc.poll() is not None:
            raise SystemExit(proc.stderr.read()[-3000:])
        time.sleep(0.05)
    proc.terminate()
    proc.wait()
    ck = {10: ck10, 10_000: src / "checkpoints" / "step-10000"}
    shutil.copytree(ck10, ck[10_000])
    meta = json.loads((ck10 / "meta.json").read_text())
    steps_per_epoch = None
    manifest = json.loads((data / "manifest.json").read_text())
    steps_per_epoch = manifest["splits"]["train"]["n_blocks"] // 8
    assert steps_per_epoch > 10_010, steps_per_epoch
    meta.update(step=10_000, epoch=0, step_in_epoch=10_000)
    (ck[10_000] / "meta.json").write_text(json.dumps(meta, indent=2))
    sched = json.loads((ck10 / "scheduler.json").read_text())
    sched.update(last_epoch=10_000, _step_count=10_001)
    (ck[10_000] / "scheduler.json").write_text(json.dumps(sched))
    return ck


def time_resume(data: Path, ckpt: Path, work: Path, tag: str) -> float:
    run_dir = work / f"resume-{tag}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "distclm.cli", "train", *common(data, run_dir),
                             f"--run.resume={ckpt}"], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        if proc.poll() is not None:
            raise SystemExit(proc.stderr.read()[-3000:])
        time.sleep(0.01)
    first = json.loads(metrics.read_text().splitlines()[0])
    proc.terminate()
    proc.wait()
    assert first["step"] == int(ckpt.name[5:]) + 1, first
    return first["time"] - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = OUT / "resume-work"
    work.mkdir(parents=True, exist_ok=True)
    data = build_data(work)
    ck = make_checkpoints(data, work)
    times = {10: [], 10_000: []}
    for r in range(args.repeats):
        for step in ((10, 10_000) if r % 2 == 0 else (10_000, 10)):
            times[step].append(time_resume(data, ck[step], work, str(step)))
            print(f"round {r + 1}: resume at step {step}: {times[step][-1]:.2f}s to the first step", flush=True)
    a, b = statistics.median(times[10]), statistics.median(times[10_000])
    table = "\n".join([
        f"Resume cost, gpt2-tiny, 1 CPU process, {json.loads((data / 'manifest.json').read_text())['splits']['train']['n_blocks']:,} "
        f"train blocks (global batch 8), median of {args.repeats} alternating rounds.", "",
        "| resume at step (of the epoch) | process start to end of first step (s) |", "|---|---|",
        f"| 10 | {a:.2f} |", f"| 10,000 | {b:.2f} |", "",
        f"ratio step 10,000 / step 10: {b / a:.3f} (target: within 10%)"])
    print("\n" + table)
    (OUT / "resume.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
