"""A hang named: the rank the others wait for, its host and its phase; then stack dumps and a distinct exit code.

Every rank runs one daemon thread. Every `beat_s` seconds, and when a new step starts (at most every 0.2 s), it

  1. publishes this rank's heartbeat under `beat/{rank}` in a store that does not need the process group: a client
     of the rendezvous TCPStore (MASTER_ADDR:MASTER_PORT; under torchrun its agent hosts it, so it outlives a
     stuck worker): {rank, host, pid, step, phase, waiting, phase_s (seconds in that phase), time};
  2. looks for a verdict under `hang` (another rank found a hang): dump this rank's stacks, exit HANG_EXIT;
  3. when this rank has been in one phase for longer than --train.hang_timeout_s, reads every heartbeat and judges:

        waiting = live ranks blocked in one collective for longer than the timeout
        lead    = the longest waiter: (its step, its phase) is where every rank has to arrive
        missing = ranks not there: silent (no heartbeat for silent_s: stopped, dead, or its host gone) or live at
                  another (step, phase), e.g. still in backward, or blocked in a Python hook
        hang    = waiting and missing both non-empty

A step, an eval or a checkpoint that takes longer than the timeout on every rank is no hang: nobody waits in a
collective meanwhile. A collective that every rank has reached and that still does not complete, and a live rank
still writing a checkpoint or the export while the others wait, are left to the backend's own timeout
(--train.dist_timeout_s): slow storage is not a hang.

The first rank to judge a hang stores the verdict (compare_set: one writer) and prints ONE line:

    distclm: hang: not arrived: rank 1 on node-b (in backward at step 10, silent for 23 s: stopped or dead);
    waiting for it: 1 rank (longest: rank 0, 21 s in all_reduce of gradients in backward at step 10);
    stacks in RUN/hang-rank*.txt; exit 75

Every rank still alive, the stuck-but-alive one included (its own thread sees the verdict), writes its Python stacks
(all threads) to RUN/hang-rank{R}.txt and exits with HANG_EXIT.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from distclm import exit_code
from distclm.atomic import publish_file

# EX_TEMPFAIL (sysexits.h): a temporary failure, a retry may work. Distinct from 1 (a bug, do not retry blindly),
# 2 (user error) and 143 (SIGTERM, saved). A restart policy retries it; docs/hangs.md says how.
HANG_EXIT = 75
SAVING = ("checkpoint", "export")  # phases of a live rank that the others may wait on for long: writing files
SHOWN = 8  # missing ranks named one by one in the line; more are counted
POLL_S, MIN_BEAT_S = 0.05, 0.2  # the thread looks at this rank's step this often; publishes at most this often


def beat_interval(timeout: float) -> float:
    """Seconds between heartbeats: a tenth of the timeout, within [0.2, 1]. A stopped rank is described by its last
    heartbeat, so this is how stale "in backward at step 10" may be; one small store write per rank and second."""
    return min(1.0, max(0.2, timeout / 10))


def age(beat: dict, now: float) -> float:
    """Seconds `beat`'s rank has been in its phase, at wall time `now` (if it is still there)."""
    return beat["phase_s"] + max(now - beat["time"], 0.0)


def judge(beats: dict, now: float, timeout: float, silent_s: float) -> dict | None:
    """rank -> heartbeat (None: never seen) -> the verdict {"missing": [...], "waiting": [...]} or None."""
    live = {r: b for r, b in beats.items() if b is not None and now - b["time"] <= silent_s}
    waiting = sorted((r for r, b in live.items() if b["waiting"] and age(b, now) > timeout),
                     key=lambda r: -age(live[r], now))
    if not waiting:
        return None
    lead = live[waiting[0]]
    at = (lead["step"], lead["phase"])
    missing = [r for r, b in sorted(beats.items()) if r not in live or (b["step"], b["phase"]) != at]
    if not missing or all(r in live and live[r]["phase"] in SAVING for r in missing):
        return None
    return {"missing": [{**(beats[r] or {"rank": r}), "silent": r not in live} for r in missing],
            "waiting": [live[r] for r in waiting], "time": now}


def describe(verdict: dict, run_dir: Path) -> str:
    """The one line of a hang."""
    now, parts = verdict["time"], []
    for b in verdict["missing"][:SHOWN]:
        if "phase" not in b:
            parts.append(f"rank {b['rank']} (never seen: no heartbeat since the start)")
            continue
        seen = f"silent for {now - b['time']:.0f} s: stopped or dead" if b["silent"] else \
            f"alive, {age(b, now):.0f} s in that phase"
        parts.append(f"rank {b['rank']} on {b['host']} (in {b['phase']} at step {b['step']}, {seen})")
    more = len(verdict["missing"]) - SHOWN
    lead, n = verdict["waiting"][0], len(verdict["waiting"])
    return (f"distclm: hang: not arrived: {', '.join(parts)}{f' and {more} more' if more > 0 else ''}; "
            f"waiting for {'it' if len(verdict['missing']) == 1 else 'them'}: {n} rank{'s' * (n > 1)} (longest: "
            f"rank {lead['rank']}, {age(lead, now):.0f} s in {lead['phase']} at step {lead['step']}); "
            f"stacks in {run_dir}/hang-rank*.txt; exit {HANG_EXIT}")


def dump_stacks(path: Path, header: str) -> None:
    """This process's Python stacks (every thread) -> `path`, fsynced and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(header + "\n\n")
        fh.flush()
        faulthandler.dump_traceback(file=fh, all_threads=True)
    publish_file(tmp, path)


def hang_exit() -> None:
    """End this process now with HANG_EXIT (the training thread may be stuck in a collective: no unwinding), the
    code written first for launchers/torchrun.sh."""
    sys.stdout.flush()
    exit_code.record(HANG_EXIT)
    os._exit(HANG_EXIT)


def connect(timeout_s: float):
    """A client of the rendezvous store (not the process group's connection), keys of this restart round only."""
    import torch.distributed as td

    store = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                        timeout=timedelta(seconds=timeout_s))
    return td.PrefixStore(f"distclm/watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


class Watchdog:
    """This rank's heartbeat and hang judge (a daemon thread); `start()` after the process group formed."""

    def __init__(self, activity, rank: int, world: int, run_dir: Path, timeout: float, store=None):
        self.activity, self.rank, self.world, self.run_dir, self.timeout = activity, rank, world, run_dir, timeout
        self.beat_s = beat_interval(timeout)
        self.silent_s = max(3 * self.beat_s, 5.0)
        self.host, self.store = socket.gethostname(), store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distclm-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        if self.store is None:
            self.store = connect(max(2 * self.beat_s, 5.0))
        self._publish()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.beat_s)

    def _beat(self) -> dict:
        phase, since = self.activity.now
        return {"rank": self.rank, "host": self.host, "pid": os.getpid(), "step": self.activity.step,
                "phase": phase, "waiting": self.activity.waiting_now, "phase_s": time.monotonic() - since,
                "time": time.time()}

    def _publish(self) -> None:
        self.store.set(f"beat/{self.rank}", json.dumps(self._beat()))

    def _read(self) -> dict:
        keys = [f"beat/{r}" for r in range(self.world)]
        present = [k for k in keys if self.store.check([k])]
        values = dict(zip(present, self.store.multi_get(present))) if present else {}
        return {r: json.loads(values[k]) if k in values else None for r, k in enumerate(keys)}

    def _run(self) -> None:
        # A new step is published at once (a stopped rank is then described by where it stopped, not by a beat
        # up to beat_s older); the store sees at most one write per rank per MIN_BEAT_S.
        last, step = time.monotonic(), self.activity.step
        while not self._stop.wait(POLL_S):
            now = time.monotonic()
            if now - last < (MIN_BEAT_S if self.activity.step != step else self.beat_s):
                continue
            last, step = now, self.activity.step
            try:
                self._publish()
                if self.store.check(["hang"]):
                    self._act(json.loads(self.store.get("hang")), mine=False)
                if time.monotonic() - self.activity.now[1] > self.timeout:
                    verdict = judge(self._read(), time.time(), self.timeout, self.silent_s)
                    if verdict is not None:
                        self._claim(verdict)
            except (RuntimeError, OSError, ValueError) as exc:  # the store went away (its host is stuck or gone)
                if self.activity.waiting_now and time.monotonic() - self.activity.now[1] > self.timeout:
                    self._unreachable(exc)

    def _claim(self, verdict: dict) -> None:
        """Store the verdict unless another rank stored one first; act on whichever is stored."""
        mine = json.dumps(verdict)
        stored = self.store.compare_set("hang", "", mine)
        stored = stored.decode() if isinstance(stored, bytes) else stored
        self._act(json.loads(stored), mine=stored == mine)

    def _act(self, verdict: dict, mine: bool) -> None:
        line = describe(verdict, self.run_dir)
        if mine:
            print(line, file=sys.stderr, flush=True)
        phase, since = self.activity.now
        dump_stacks(self.run_dir / f"hang-rank{self.rank}.txt",
                    f"rank {self.rank} on {self.host} (pid {os.getpid()}), step {self.activity.step}, "
                    f"in {phase} for {time.monotonic() - since:.0f} s\n{line}")
        if mine:  # the others (a stuck-but-alive rank too) read the verdict at their next beat and dump theirs
            time.sleep(2 * self.beat_s)
        hang_exit()

    def _unreachable(self, exc: Exception) -> None:
        phase, since = self.activity.now
        line = (f"distclm: hang: rank {self.rank} on {self.host} waited {time.monotonic() - since:.0f} s in {phase} "
                f"at step {self.activity.step}, and the heartbeat store at {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')} does not answer ({exc}): the rank hosting it may be the one stuck; "
                f"stacks in {self.run_dir}/hang-rank*.txt; exit {HANG_EXIT}")
        print(line, file=sys.stderr, flush=True)
        dump_stacks(self.run_dir / f"hang-rank{self.rank}.txt", line)
        hang_exit()


def start_watchdog(activity, run_dir: Path, timeout: float) -> Watchdog | None:
    """The watchdog of this rank, started; None with one process or --train.hang_timeout_s=0."""
    from distclm import dist

    if timeout <= 0 or dist.world_size() == 1 or not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
        return None
    try:
        return Watchdog(activity, dist.rank(), dist.world_size(), run_dir, timeout).start()
    except (RuntimeError, OSError) as exc:  # training goes on; only the naming of hangs is lost
        print(f"distclm: warning: rank {dist.rank()}: no hang watchdog, the rendezvous store at "
              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} did not answer ({exc})", file=sys.stderr)
        return None
