"""A rank slow in its own compute named while training runs: slowed from inside its forward (a test hook) or from
outside (SIGSTOP/SIGCONT at a fixed duty cycle on its pid), on 2 and 3 processes, DDP and ZeRO-2/3. Named within 20
steps, never another rank; an undisturbed run names none. metrics.jsonl carries the wait part."""

from __future__ import annotations

import re

import pytest

from tests.support.cli import Lines, start_cli
from tests.support.env import child_env
from tests.support.runs import read_metrics
from tests.support.stopper import DutyCycle, NoisyNeighbour, rank_pid, release

STEPS = 24  # named within 20 steps, and no other rank named until the end
NAMED = re.compile(r"^rank (\d+) \(\S+\) is slow: (.+?) (\d+\.\d+) s/step, median (\d+\.\d+) s$")


def straggler_run(run, blocks, nproc: int, strategy: str, slow_rank: int | None, way: str, steps: int = STEPS,
                  stop: tuple[float, float] = (0.06, 0.15)) -> str:
    """STEPS steps logged every 2; rank `slow_rank` slowed `way`: "forward" (0.3 s more per micro-batch forward),
    "stop" (SIGSTOP `stop[0]` s of every `stop[1]` s: by default 60 ms of 150, 40% of its time gone) or "hog" (a
    noisy neighbour: a busy process pinned to the slow rank's core, the other ranks on another core) -> the console."""
    hooks = {"DISTCLM_TEST_SLOW_FORWARD": f"{slow_rank}:0.3"} if way == "forward" else {}
    proc = start_cli("train", f"--data.dir={blocks}", "--model.name=gpt2-tiny", f"--run.dir={run}",
                     f"--train.max_steps={steps}", "--train.micro_batch_size=4", "--log.every_steps=2",
                     "--log.interval_s=0", "--eval.max_blocks=4", f"--train.strategy={strategy}", nproc=nproc,
                     env=child_env(hooks=hooks))
    lines = Lines(proc)
    try:
        if way == "stop":
            with DutyCycle(rank_pid(proc.pid, slow_rank), stopped_s=stop[0], period_s=stop[1]):
                proc.wait(timeout=900)
        elif way == "hog":
            with NoisyNeighbour([rank_pid(proc.pid, r) for r in range(nproc)], slow_rank):
                proc.wait(timeout=900)
        else:
            proc.wait(timeout=900)
    finally:
        release(proc)
    out = lines.text()
    assert proc.returncode == 0, out[-3000:]
    return out


def check_named(out: str, run, slow_rank: int | None) -> None:
    lines = out.splitlines()
    named = [(i, NAMED.match(line)) for i, line in enumerate(lines) if NAMED.match(line)]
    for step, rec in sorted(read_metrics(run).items()):  # the figures, for the record
        p = rec["step_parts"]
        print(f"step {step}: " + ", ".join(f"{k} max {p[k]['max']:.3f} (rank {p[k]['max_rank']}) median "
                                           f"{p[k]['median']:.3f}" for k in ("compute", "wait")))
    if slow_rank is None:
        assert not named, [m.group(0) for _, m in named]
        return
    assert named, out[-3000:]
    assert {int(m.group(1)) for _, m in named} == {slow_rank}  # never another rank
    first, m = named[0]
    # printed while a log step gathers the step times, before that step's own console line
    at = 1 + [int(s.group(1)) for line in lines[:first] if (s := re.match(r"step (\d+)/", line))][-1]
    print(f"named at step {at}: {m.group(0)}")
    assert at <= 20 and m.group(2) in ("forward+backward", "optimizer step")
    parts = read_metrics(run)[at]["step_parts"]
    assert parts["compute"]["max_rank"] == slow_rank and parts["wait"]["max_rank"] != slow_rank


def test_a_rank_stopped_40_percent_of_the_time_is_named(pydoc_blocks, tmp_path):
    run = tmp_path / "run"
    check_named(straggler_run(run, pydoc_blocks, 2, "ddp", 1, "stop", steps=12), run, 1)  # 12: CI time


@pytest.mark.extended  # CI: a stopped rank on 2 processes (above), no name in test_observability's tracked run
@pytest.mark.parametrize("nproc,strategy,slow_rank,way,stop", [
    (3, "ddp", 1, "stop", (0.06, 0.15)), (3, "zero3", 2, "stop", (0.06, 0.15)), (2, "zero2", 1, "stop", (0.06, 0.15)),
    (3, "zero2", 2, "stop", (0.06, 0.15)), (2, "ddp", 1, "stop", (0.03, 0.10)), (2, "zero3", 0, "stop", (0.2, 0.5)),
    (2, "ddp", 1, "hog", None), (2, "zero2", 1, "hog", None),
    (2, "ddp", 1, "forward", None), (3, "ddp", 0, "forward", None), (2, "zero2", 0, "forward", None),
    (2, "zero3", 1, "forward", None), (3, "ddp", None, "none", None), (2, "zero2", None, "none", None)])
def test_a_rank_slow_in_compute_is_named_and_no_other(pydoc_blocks, tmp_path, nproc, strategy, slow_rank, way, stop):
    run = tmp_path / "run"
    check_named(straggler_run(run, pydoc_blocks, nproc, strategy, slow_rank, way, stop=stop), run, slow_rank)
