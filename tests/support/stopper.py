"""Slowing or stopping one rank from outside, the way a throttled device, a noisy neighbour or a dead host does:
SIGSTOP/SIGCONT on the rank's own pid (found among the launcher's children by its RANK), or a busy process pinned
to its CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil


def rank_pid(launcher_pid: int, rank: int, timeout: float = 120) -> int:
    """The pid of the worker with RANK=`rank` under the launcher `launcher_pid` (waits until it has started)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(launcher_pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "distclm.cli" in " ".join(child.cmdline()):
                    return child.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid} within {timeout}s")


class DutyCycle:
    """`pid` stopped for `stopped_s` out of every `period_s` seconds, from a thread, until stop()."""

    def __init__(self, pid: int, stopped_s: float, period_s: float):
        self.pid, self.stopped_s, self.period_s = pid, stopped_s, period_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "DutyCycle":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                psutil.Process(self.pid).send_signal(signal.SIGSTOP)
                time.sleep(self.stopped_s)
                psutil.Process(self.pid).send_signal(signal.SIGCONT)
                self._done.wait(self.period_s - self.stopped_s)
        except psutil.NoSuchProcess:
            return
        finally:
            try:
                psutil.Process(self.pid).send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass


class NoisyNeighbour:
    """A busy process sharing the CPU of rank `slow` (pinned together), every other rank pinned to another CPU:
    the slow rank gets about half a core, the way a neighbour on a shared host takes it."""

    def __init__(self, pids: list[int], slow: int):
        cpus = sorted(os.sched_getaffinity(0))
        assert len(cpus) >= 2, "a noisy neighbour needs 2 CPUs: one shared with it, one for the other ranks"
        self.pids, self.slow, self.cpus = pids, slow, cpus
        self.hog: subprocess.Popen | None = None

    def __enter__(self) -> "NoisyNeighbour":
        for rank, pid in enumerate(self.pids):  # threads too (gloo's, the watchdog's): every task of the process
            for task in psutil.Process(pid).threads():
                os.sched_setaffinity(task.id, [self.cpus[0] if rank == self.slow else self.cpus[1]])
        self.hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setaffinity(self.hog.pid, [self.cpus[0]])
        return self

    def __exit__(self, *exc) -> None:
        self.hog.kill()
        self.hog.wait()


def kill_workers(launcher_pid: int) -> None:
    """Every process under the launcher continued (a stopped one cannot die otherwise) and killed."""
    try:
        family = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass


def release(launcher) -> None:
    """Teardown: every process under the launcher (a subprocess.Popen) continued and killed, then the launcher."""
    kill_workers(launcher.pid)
    if launcher.poll() is None:
        launcher.kill()
    launcher.wait(timeout=30)
