"""What this rank is doing now, and how long it has been blocked waiting for the other ranks.

Two readers:

    the heartbeat (watchdog.py)     this rank's step and phase (data, forward, backward, optimizer, eval, checkpoint,
                                    or a collective: "all_reduce in backward") and since when
    the step parts (straggler.py)   seconds blocked in collectives per part of the step, so that a rank's own work
                                    (wall time less waiting) can be compared across ranks

Waiting is measured where a rank blocks:

    every torch.distributed collective called from Python (DeepSpeed's ZeRO reduce-scatters and all-gathers go
    through them, as does DDP's buffer broadcast): the time inside the call, and for an async one inside .wait();

    DDP's gradient all-reduce, which the C++ reducer runs overlapped with the backward: a comm hook launches each
    bucket's all-reduce (as DDP's default does) and marks when the LAST bucket is launched. From then until the
    backward returns this rank computes nothing; it waits for the slowest rank's last bucket:

        ddp_wait = t(backward returned) - t(last bucket launched)

On a GPU the marks are CUDA events on the current stream (the compute stream stalls while it waits for NCCL),
resolved at the log step, never per step; on CPU they are host times. The CUDA path is not exercised by the tests
(no GPU on the CI machines).
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from typing import Iterator

# The collectives a rank can block in (torch.distributed names). Async ones return a Work whose wait() blocks.
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "_all_gather_base",
               "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce",
               "broadcast", "broadcast_object_list", "_broadcast_coalesced", "all_to_all", "all_to_all_single",
               "gather", "scatter", "barrier", "monitored_barrier")


class HostClock:
    """Marks are host seconds (time.perf_counter)."""

    lazy = False

    @staticmethod
    def mark() -> float:
        return time.perf_counter()

    @staticmethod
    def seconds(a, b) -> float:
        return b - a


class CudaClock:
    """Marks are CUDA events recorded on the current stream; seconds are read once the events completed (the log
    step synchronises), so timing adds no synchronisation to a step."""

    lazy = True

    @staticmethod
    def mark():
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def seconds(a, b) -> float:
        b.synchronize()
        return a.elapsed_time(b) / 1e3  # elapsed_time is in ms


def clock_for(device) -> HostClock | CudaClock:
    return CudaClock() if getattr(device, "type", "cpu") == "cuda" else HostClock()


class Activity:
    """This rank's current (phase, since) and step, and its waits, recorded into `times` (straggler.StepTimes)."""

    def __init__(self, times=None, clock=None):
        self.times, self.clock = times, clock or HostClock()
        self.step = 0
        self.now = ("setup", time.monotonic())  # one tuple, so the heartbeat thread reads it whole
        self.part: str | None = None  # the step part whose waits are counted; None outside the step
        self._depth = 0  # >0 inside a timed collective: a collective calling another is timed once
        self._open = None  # DDP: (mark, phase before) from the last bucket's launch until the backward returns

    @property
    def waiting_now(self) -> bool:
        return self._depth > 0 or self._open is not None

    @contextmanager
    def phase(self, name: str, part: str | None = None) -> Iterator[None]:
        """`name` is what this rank does inside the block; its waits count to step part `part` (if given)."""
        outer, outer_part = self.now, self.part
        self.now = (name, time.monotonic())
        self.part = part or outer_part
        try:
            yield
        finally:
            self.close_wait()
            self.now, self.part = outer, outer_part

    @contextmanager
    def waiting(self, name: str) -> Iterator[None]:
        """Blocked in collective `name` (the heartbeat says "`name` in <phase>")."""
        if self._depth:
            yield
            return
        outer = self.now
        self._depth += 1
        self.now = (f"{name} in {outer[0]}", time.monotonic())
        a = self.clock.mark()
        try:
            yield
        finally:
            self._depth -= 1
            self.now = outer
            self._count_wait(a)

    def open_wait(self, name: str) -> None:
        """From now until the enclosing phase ends, this rank only waits (DDP: its last bucket is launched)."""
        if self._open is None:
            self._open = (self.clock.mark(), self.now)
            self.now = (f"{name} in {self.now[0]}", time.monotonic())

    def close_wait(self) -> None:
        if self._open is not None:
            (a, outer), self._open = self._open, None
            self.now = outer
            self._count_wait(a)

    def _count_wait(self, a) -> None:
        """Blocked from mark `a` until now: counted to the current step part (none outside the step)."""
        if self.part is not None and self.times is not None:
            self.times.wait(self.part, a, self.clock.mark())


class TimedWork:
    """An async collective's Work whose wait() counts as waiting; everything else is the Work's own."""

    __slots__ = ("_work", "_activity", "_name")

    def __init__(self, work, activity: Activity, name: str):
        self._work, self._activity, self._name = work, activity, name

    def wait(self, *args, **kwargs):
        with self._activity.waiting(self._name):
            return self._work.wait(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self._work, attr)


def _timed(activity: Activity, name: str, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with activity.waiting(name):
            work = fn(*args, **kwargs)
        return TimedWork(work, activity, name) if hasattr(work, "wait") and not activity._depth else work

    call.__wrapped_collective__ = fn
    return call


@contextmanager
def instrumented(activity: Activity) -> Iterator[Activity]:
    """torch.distributed's collectives timed into `activity` while the block runs (installed before DeepSpeed
    starts: its comm backend keeps references to some of these functions)."""
    import torch.distributed as td
    import torch.distributed.distributed_c10d as c10d

    saved = []
    for module in (td, c10d):
        for name in COLLECTIVES:
            fn = getattr(module, name, None)
            if fn is not None and not hasattr(fn, "__wrapped_collective__"):
                saved.append((module, name, fn))
                setattr(module, name, _timed(activity, name, fn))
    try:
        yield activity
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def attach_ddp(activity: Activity, model) -> None:
    """DDP: each bucket all-reduced as DDP's default hook does (mean over ranks); the last launch opens the wait."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return

    def hook(state, bucket):
        fut = allreduce_hook(state, bucket)
        if bucket.is_last():
            activity.open_wait("all_reduce of gradients")
        return fut

    model.register_comm_hook(None, hook)
