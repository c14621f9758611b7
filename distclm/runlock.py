"""One writer: a run dir is held by a lock file for the life of a training job.

    RUN/distclm.lock   {"host", "boot_id", "pid", "pid_start", "token", "acquired", "refreshed", "refresh_s",
                        "stale_after_s"}   (times: seconds since the epoch, by the holder's clock)

Rank 0 takes it before anything is written into the run dir (rundir.claim_run_dir; the other ranks take its
verdict), and releases it on every way out of train_once (done, an error, a SIGTERM's 143). A second job is refused
with one line naming the holder's host and pid. A lock nobody holds any more is taken over, and that is said:

- on this host (same hostname and boot id): its pid is gone, or is another process now (its start time differs);
- on another host: its lease ran out. The holder rewrites `refreshed` every REFRESH_S from a daemon thread; a lock
  not refreshed for STALE_S (four refreshes missed) is stale. A job that finds a fresh lease of another host waits
  for it to run out before it refuses: the holder may be a pod that was just killed (SIGKILL, the OOM killer)
  and is restarting elsewhere, which must resume, not fail as a user error. Hosts' clocks must agree to well
  within STALE_S (NTP).

The lock is a file created with O_CREAT | O_EXCL rather than flock/fcntl: an exclusive create is atomic on local
file systems and on NFS (v3 and later: the server decides it), whereas flock and fcntl locks are advisory,
per-client, and on many NFS and FUSE mounts either not forwarded to the server or silently local to one node. A
file's existence is seen by every node that mounts the run dir, survives a crash (so staleness must be judged,
above), and names its holder.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from distclm.errors import UserError

LOCK = "distclm.lock"
LOCK_FILES = (LOCK, f"{LOCK}.takeover")  # what a job taking a new run dir may have put there a moment ago
REFRESH_S = 30.0
STALE_S = 120.0
POLL_S = 5.0  # while waiting for another host's lease to run out
TAKEOVER_S = 30.0  # a takeover's mutex older than this was left by a taker that died


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): tells a pid reused apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # the name in (...) may hold spaces; fields 3.. follow it


@dataclass
class Holder:
    host: str
    pid: int
    token: str
    refreshed: float
    boot_id: str = ""
    pid_start: str = ""
    acquired: float = 0.0
    refresh_s: float = REFRESH_S
    stale_after_s: float = STALE_S

    @classmethod
    def me(cls) -> "Holder":
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, _boot_id(), _pid_start(os.getpid()),
                   now)

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname() and self.boot_id == _boot_id()

    def lease_left(self) -> float:
        return self.refreshed + self.stale_after_s - time.time()

    def stale_reason(self) -> str | None:
        """Why nobody holds this lock any more, or None while its holder may still be there."""
        if self.on_this_host():
            if self.pid == os.getpid() and self.pid_start == _pid_start(self.pid):
                return None  # this very process (a second train in it): not stale, and refused as held
            if not _alive(self.pid):
                return f"pid {self.pid} on {self.host} is gone"
            if self.pid_start and _pid_start(self.pid) not in ("", self.pid_start):
                return f"pid {self.pid} on {self.host} is another process now"
            return None
        if self.lease_left() <= 0:
            return f"its lease from {self.host} was last refreshed {time.time() - self.refreshed:.0f}s ago"
        return None

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def read_holder(path: Path) -> Holder | None:
    """The lock's holder; None when there is no lock file. A file being written (or garbled) counts as held by an
    unknown holder whose lease is the file's modification time."""
    try:
        text, mtime = path.read_text(encoding="utf-8"), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return Holder(**{k: data[k] for k in Holder.__dataclass_fields__ if k in data})
    except (ValueError, TypeError, KeyError):
        return Holder("(unknown host)", -1, "", mtime)


def _write_new(path: Path, holder: Holder) -> None:
    """Create the lock file, failing with FileExistsError when it exists (atomic: see the module docstring)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(asdict(holder)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _take_over(path: Path, stale: Holder) -> bool:
    """Remove the stale lock `stale`; False when another job is taking it over right now, or the file there is not
    `stale` any more. Takers go one at a time through a second exclusive file, and remove the lock only if it still
    holds `stale` (read again under that mutex): of two jobs that judged one lock stale, one removes it, and a
    lock just taken by a third is never removed. A mutex left by a taker that died mid-way (it holds it for
    milliseconds) is cleared after TAKEOVER_S."""
    mutex = path.with_name(f"{path.name}.takeover")
    try:
        os.close(os.open(mutex, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        try:
            if time.time() - mutex.stat().st_mtime > TAKEOVER_S:
                mutex.unlink()
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return False
    try:
        current = read_holder(path)
        if current is None or (current.token, current.refreshed) != (stale.token, stale.refreshed):
            return False
        path.unlink()
        return True
    finally:
        mutex.unlink(missing_ok=True)


class RunLock:
    """A held lock on a run dir; `release()` (idempotent) removes it if it is still this job's."""

    def __init__(self, path: Path, holder: Holder):
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, name="distclm-run-lock", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, run_dir: Path, say=print) -> "RunLock":
        path, me = Path(run_dir) / LOCK, Holder.me()
        deadline = taken = None
        while True:
            try:
                _write_new(path, me)
                if taken is not None:
                    say(f"lock: took over the stale lock {path} of {taken}")
                return cls(path, me)
            except FileExistsError:
                pass
            holder = read_holder(path)
            if holder is None:
                continue  # released between our create and our read
            why = holder.stale_reason()
            if why is not None:
                if _take_over(path, holder):
                    taken = f"{holder.describe()} ({why})"
                continue
            if not holder.on_this_host() and (deadline is None or time.time() < deadline):
                if deadline is None:
                    deadline = time.time() + holder.lease_left() + 1.0
                    say(f"lock: {path} is held by {holder.describe()}; waiting up to {holder.lease_left():.0f}s "
                        f"for its lease to run out (a holder that is alive keeps refreshing it)")
                time.sleep(max(0.1, min(POLL_S, deadline - time.time())))
                continue
            raise UserError(held_message(Path(run_dir), holder))

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.holder.refresh_s):
            self.refresh()

    def refresh(self) -> None:
        """Rewrite `refreshed` (write aside, rename over: a reader never sees half a file), if the lock is ours."""
        current = read_holder(self.path)
        if current is None or current.token != self.holder.token:
            return  # released, or taken over by a job that judged this one gone: nothing of ours to refresh
        self.holder.refreshed = time.time()
        tmp = self.path.with_name(f"{self.path.name}.{self.holder.token}.tmp")
        try:
            tmp.write_text(json.dumps(asdict(self.holder)) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:  # a full disk or a storage hiccup: the next refresh tries again
            pass

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)


def held_message(run_dir: Path, holder: Holder) -> str:
    return (f"--run.dir={run_dir} is in use: a training job holds it ({holder.describe()}, lock {run_dir / LOCK}); "
            f"wait for it to end, or use another --run.dir")


def live_holder(run_dir: Path) -> Holder | None:
    """The job holding `run_dir`'s lock now, or None (no lock, or a stale one). Reads only."""
    holder = read_holder(Path(run_dir) / LOCK)
    if holder is None or holder.stale_reason() is not None:
        return None
    return holder
