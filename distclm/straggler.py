"""Slow ranks named while training runs: the rank the others wait for.

Each rank times every step in parts (seconds per step over a logged interval):

    data       reading its blocks and moving them to the device
    compute    forward + backward of its micro-batches, its own work: waits inside them left out
    optimizer  clipping + optimizer step, its own work (ZeRO's collectives in it left out)
    comm       the step-end all-reduce of loss and stop flag (wall time, as logged before waits were a part)
    wait       every collective this rank blocked in during the step: DDP's gradient all-reduce after its last
               bucket, ZeRO's reduce-scatters and all-gathers, the step-end all-reduce (activity.py measures them)

Why own work: ranks run in lockstep, so every rank's step takes as long as the slowest rank's; a fast rank spends
the difference waiting in a collective. With waits left out, the slow rank is the one whose own work is long:

    own_p(r)   = wall_p(r) - wait_p(r)                      for p in data, compute, optimizer
    step       = median over ranks of (sum_p own_p(r) + wait(r))     ~ the wall time of a step
    slow(r, p) = own_p(r) > 1.25 x median_{q != r} own_p(q)  and  own_p(r) - that median > 0.10 x step

Like nvidia-resiliency-ext's relative score (a rank against its peers, not against a fixed budget). Why 1.25 and
not the 1.5 used when only data reads were compared: a rank stopped 40% of the time (SIGSTOP 60 ms of every 150)
measured 1.3-1.5x its peer's own compute on 2 shared CPU cores, because the stops also land in its waits and between
steps; and a rank 1.25x slower already costs every rank 20% of its time. The 10%-of-a-step margin and the 3
intervals in a row keep noise from naming anyone. A rank slow in the same part for 3 logged intervals in a row is
named, once per streak:

    rank 1 (node-b) is slow: forward+backward 0.21 s/step, median 0.08 s

Sums over an interval travel in the ONE small all-gather of the log step (no collective per step). `comm` and
`wait` are reported, never blamed: a rank that waits is waiting for another one.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

PARTS = ("data", "compute", "optimizer", "comm", "wait")
OWN = PARTS[:3]  # the parts that are a rank's own work, compared across ranks
LABELS = {"data": "data wait", "compute": "forward+backward", "optimizer": "optimizer step", "comm": "communication",
          "wait": "waiting in collectives"}
RATIO, SHARE, INTERVALS = 1.25, 0.10, 3


@dataclass
class StepTimes:
    """This rank's wall time and waits per part, summed since the last logged step. Marks come from `clock`
    (activity.HostClock: seconds now; CudaClock: events, read at take())."""

    clock: object = None
    walls: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    waits: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    pending: list = field(default_factory=list)  # (sums, part, a, b) of a lazy clock
    steps: int = 0

    def span(self, part: str, a, b) -> None:
        """Part `part` ran from mark a to mark b."""
        self._put(self.walls, part, a, b)

    def wait(self, part: str, a, b) -> None:
        """Blocked in a collective from mark a to mark b, inside part `part`."""
        self._put(self.waits, part, a, b)

    def _put(self, sums: dict, part: str, a, b) -> None:
        if getattr(self.clock, "lazy", False):
            self.pending.append((sums, part, a, b))
        else:
            sums[part] += b - a

    def step_done(self) -> None:
        self.steps += 1

    def take(self) -> list[float]:
        """Seconds per step of each part (PARTS order) over the interval, then start a new interval."""
        for sums, part, a, b in self.pending:
            sums[part] += self.clock.seconds(a, b)
        n = max(self.steps, 1)
        own = [max(self.walls[p] - self.waits[p], 0.0) / n for p in OWN]
        per_step = [*own, self.walls["comm"] / n, sum(self.waits.values()) / n]
        self.walls, self.waits = dict.fromkeys(PARTS, 0.0), dict.fromkeys(PARTS, 0.0)
        self.pending, self.steps = [], 0
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
    wait = PARTS.index("wait")
    step = statistics.median(sum(row[:len(OWN)]) + row[wait] for row in per_rank)  # ~ a step's wall time
    found = {}
    for i, part in enumerate(OWN):
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
