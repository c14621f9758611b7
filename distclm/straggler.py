"""Slow ranks named while training runs.

Each rank times every step in four parts (seconds):

    data       reading its blocks and moving them to the device
    compute    forward + backward of its micro-batches (DDP's gradient all-reduce overlaps the backward)
    optimizer  clipping + optimizer step (ZeRO's partitioned update and its collectives)
    comm       the step's all-reduce of loss and stop flag: mostly waiting for the slowest rank

Sums over a logged interval travel in ONE small all-gather per logged step (not a collective per step).
Rank 0 then compares ranks part by part: a rank whose part takes more than 1.5x the median of the other
ranks, by more than 10% of a median step, is slow in that part; named after 3 logged intervals in a row:

    rank 1 (node-b) is slow: data wait 0.21 s/step, median 0.01 s

`comm` is reported, never blamed: a rank that waits is waiting for another one.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

PARTS = ("data", "compute", "optimizer", "comm")
LABELS = {"data": "data wait", "compute": "forward+backward", "optimizer": "optimizer step", "comm": "communication"}
RATIO, SHARE, INTERVALS = 1.5, 0.10, 3


@dataclass
class StepTimes:
    """This rank's time per part, summed since the last logged step."""

    sums: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    steps: int = 0

    def add(self, **seconds: float) -> None:
        for part, s in seconds.items():
            self.sums[part] += s

    def step_done(self) -> None:
        self.steps += 1

    def take(self) -> list[float]:
        """Seconds per step of each part over the interval, then start a new interval."""
        per_step = [self.sums[p] / max(self.steps, 1) for p in PARTS]
        self.sums, self.steps = dict.fromkeys(PARTS, 0.0), 0
        return per_step


def summary(per_rank: list[list[float]]) -> dict:
    """{part: {"max", "median", "max_rank"}} of one interval (seconds per step), for metrics.jsonl."""
    out = {}
    for i, part in enumerate(PARTS):
        column = [row[i] for row in per_rank]
        top = max(range(len(column)), key=column.__getitem__)
        out[part] = {"max": column[top], "median": statistics.median(column), "max_rank": top}
    return out


def slow(per_rank: list[list[float]]) -> dict[tuple[int, str], tuple[float, float]]:
    """(rank, part) -> (its s/step, the other ranks' median) for every part slower than it should be."""
    if len(per_rank) < 2:
        return {}
    step = statistics.median(sum(row[:3]) for row in per_rank)  # data + compute + optimizer
    found = {}
    for i, part in enumerate(PARTS[:3]):
        for rank, row in enumerate(per_rank):
            others = statistics.median(r[i] for j, r in enumerate(per_rank) if j != rank)
            if row[i] > RATIO * others and row[i] - others > SHARE * step:
                found[(rank, part)] = (row[i], others)
    return found


@dataclass
class SlowRankWatch:
    """Rank 0's memory of which (rank, part) were slow in consecutive intervals; says so once per streak."""

    hosts: list[str]
    streaks: dict = field(default_factory=dict)

    def update(self, per_rank: list[list[float]]) -> list[str]:
        flagged = slow(per_rank)
        self.streaks = {key: self.streaks.get(key, 0) + 1 for key in flagged}
        return [f"rank {rank} ({self.hosts[rank]}) is slow: {LABELS[part]} {value:.2f} s/step, median {median:.2f} s"
                for (rank, part), (value, median) in flagged.items() if self.streaks[(rank, part)] == INTERVALS]
