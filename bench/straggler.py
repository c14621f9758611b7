"""The per-step cost of naming slow and hung ranks: waits timed in every collective (and DDP's comm hook), the phase
kept for the heartbeat, and the watchdog thread, against the same run with all of it switched off from the outside.

    python bench/straggler.py [--strategies ddp,zero2] [--nproc 2] [--steps 30] [--repeats 3] [--micro 4]
    python bench/straggler.py --unit [--strategies ddp,zero2,zero3]   # per-call costs x calls per step

Whole runs compare within a few % only on a quiet machine (a load of 10 on 2 cores swung them by +-30%). --unit
measures what the features add in-process instead: the cost of one phase, one timed collective (wrapper + Work
proxy) and one heartbeat, times how many of each a step makes (counted in a short run of each strategy):

    added per step = phases x c_phase + collectives x c_collective   (+ heartbeats: a thread, ~1 per second)

gpt2-tiny on the embedded pydoc corpus (block 64), `distclm train` under torchrun, the two variants alternated
over --repeats rounds, each a fresh launch. s/step = (t_N - t_W) / (N - W) from metrics.jsonl's per-step wall
clock after W warm-up steps; medians over rounds; ratio = on / off. Written to bench/out/straggler.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from distclm.dist import free_port  # noqa: E402

WARMUP = 5


def switch_off() -> None:
    """The features under test removed: no collective wrappers, no DDP comm hook, no phases, no watchdog."""
    import distclm.activity as activity
    import distclm.train as train

    train.instrumented = lambda act: contextlib.nullcontext(act)
    train.attach_ddp = lambda act, model: None
    train.start_watchdog = lambda *a: None
    activity.Activity.phase = lambda self, name, part=None: contextlib.nullcontext()


def count_calls(out: Path) -> None:
    """Count the phases and timed collectives of the run; written to `out` (JSON) at exit by rank 0."""
    import atexit

    import distclm.activity as activity

    counts = {"phases": 0, "collectives": 0}
    phase, waiting = activity.Activity.phase, activity.Activity.waiting

    def counted_phase(self, *a, **k):
        counts["phases"] += 1
        return phase(self, *a, **k)

    def counted_waiting(self, *a, **k):
        counts["collectives"] += not self._depth
        return waiting(self, *a, **k)

    activity.Activity.phase, activity.Activity.waiting = counted_phase, counted_waiting
    if os.environ.get("RANK") == "0":
        atexit.register(lambda: out.write_text(json.dumps(counts)))


def child(argv: list[str]) -> int:
    if os.environ.get("BENCH_SWITCH_OFF") == "1":
        switch_off()
    if os.environ.get("BENCH_COUNT"):
        count_calls(Path(os.environ["BENCH_COUNT"]))
    from distclm.cli import main

    return main(argv)


def unit_costs(n: int = 20000) -> dict:
    """Seconds per call: a phase, a timed collective with its Work's wait (no-op collective), a heartbeat."""
    import time

    import torch.distributed as td

    from distclm.activity import Activity, _timed
    from distclm.dist import free_port as port
    from distclm.straggler import StepTimes
    from distclm.watchdog import Watchdog

    act = Activity(StepTimes())
    act.part = "compute"

    class Work:
        def wait(self):
            return True

    fn = _timed(act, "all_reduce", lambda *a, **k: Work())
    costs = {}
    t = time.perf_counter()
    for _ in range(n):
        with act.phase("forward", "compute"):
            pass
    costs["phase"] = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        fn().wait()
    costs["collective"] = (time.perf_counter() - t) / n
    store = td.TCPStore("127.0.0.1", port(), 1, is_master=True)
    dog = Watchdog(act, 0, 2, Path(tempfile.gettempdir()), 120.0, store=store)
    t = time.perf_counter()
    for _ in range(n // 10):
        dog._publish()
        store.check(["hang"])
    costs["heartbeat"] = (time.perf_counter() - t) / (n // 10)
    return costs


def counted(strategy: str, nproc: int, steps: int, micro: int, data: Path, work: Path) -> dict:
    out = work / f"counts-{strategy}.json"
    os.environ["BENCH_COUNT"] = str(out)
    try:
        s_per_step = launch(False, strategy, nproc, steps, micro, data, work)
    finally:
        del os.environ["BENCH_COUNT"]
    return {**json.loads(out.read_text()), "s_per_step": s_per_step}


def launch(off: bool, strategy: str, nproc: int, steps: int, micro: int, data: Path, work: Path) -> float:
    run = work / f"run-{strategy}-{'off' if off else 'on'}"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    env = {**os.environ, "BENCH_SWITCH_OFF": "1" if off else "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, "--child", "train", f"--data.dir={data}", "--model.name=gpt2-tiny",
           f"--run.dir={run}", f"--train.max_steps={steps}", f"--train.micro_batch_size={micro}",
           f"--train.strategy={strategy}", "--log.every_steps=1", "--log.interval_s=1000", "--eval.at_end=false",
           "--eval.max_blocks=1", "--run.resume=none"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} off={off} failed:\n{proc.stderr[-3000:]}")
    times = [json.loads(line)["time"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    return (times[-1] - times[WARMUP - 1]) / (len(times) - WARMUP)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", default="ddp")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--unit", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distclm-bench-straggler-"))
    data = work / "pydoc64"
    subprocess.run([sys.executable, "-m", "distclm.cli", "prepare", "--data.source=pydoc", f"--data.dir={data}",
                    "--data.block_size=64"], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    if args.unit:
        return unit_table(args, data, work)
    rows = ["| strategy | processes | s/step on | s/step off | on/off | rounds (on, off) |", "|---|---|---|---|---|---|"]
    for strategy in args.strategies.split(","):
        on, off = [], []
        for _ in range(args.repeats):  # alternated: drift on a shared machine hits both alike
            on.append(launch(False, strategy, args.nproc, args.steps, args.micro, data, work))
            off.append(launch(True, strategy, args.nproc, args.steps, args.micro, data, work))
            print(f"{strategy}: on {on[-1]:.4f} s/step, off {off[-1]:.4f} s/step", flush=True)
        a, b = statistics.median(on), statistics.median(off)
        rows.append(f"| {strategy} | {args.nproc} | {a:.4f} | {b:.4f} | {a / b:.3f} | "
                    f"{', '.join(f'({x:.3f}, {y:.3f})' for x, y in zip(on, off))} |")
    write_table("straggler.md", f"gpt2-tiny, micro {args.micro}, {args.steps} steps (warm-up {WARMUP}), "
                                f"{args.repeats} rounds, medians", rows)


def write_table(name: str, header: str, rows: list[str]) -> None:
    """Print a markdown table and keep it in bench/out/NAME under its one-line header."""
    table = "\n".join(rows)
    print(table)
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(f"{header}\n\n{table}\n")


def unit_table(args, data: Path, work: Path) -> None:
    c = unit_costs()
    rows = [f"per call: phase {c['phase'] * 1e6:.2f} us, timed collective + wait {c['collective'] * 1e6:.2f} us, "
            f"heartbeat (store set + check, in its own thread, ~1/s) {c['heartbeat'] * 1e6:.0f} us", "",
            "| strategy | phases/step | collectives/step | s/step | added us/step | added / step |",
            "|---|---|---|---|---|---|"]
    for strategy in args.strategies.split(","):
        n = counted(strategy, args.nproc, args.steps, args.micro, data, work)
        per = {k: n[k] / args.steps for k in ("phases", "collectives")}  # set-up and the final save included
        added = per["phases"] * c["phase"] + per["collectives"] * c["collective"] + n["s_per_step"] * c["heartbeat"]
        rows.append(f"| {strategy} | {per['phases']:.1f} | {per['collectives']:.1f} | {n['s_per_step']:.3f} | "
                    f"{added * 1e6:.0f} | {added / n['s_per_step']:.5f} |")
    write_table("straggler-unit.md", f"gpt2-tiny, micro {args.micro}, {args.nproc} processes, {args.steps} steps",
                rows)


if __name__ == "__main__":
    main()
