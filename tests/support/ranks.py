"""Ranks started by hand, the way a launcher starts them (RANK, GROUP_RANK, ...), so that each process can be
started in its own conditions (another hostname, another mount of the run dir, a bad interface)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.env import REPO, child_env


def can_unshare() -> str | None:
    if shutil.which("unshare") is None:
        return "the `unshare` command (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--mount", "--uts", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"`unshare --mount --uts` is not permitted here: {probe.stderr.strip()}"


def rank_env(rank: int, world: int, port: int, hooks: dict[str, str] | None = None, **extra: str) -> dict:
    """What a launcher gives each process: one process per node here, node rank = rank."""
    env = child_env(hooks)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(rank),
               GROUP_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)
    return env


def as_host(hostname: str, cmd: list[str], hide: Path | None = None) -> list[str]:
    """cmd under its own hostname; with `hide`, that folder is an empty private tmpfs for it (a node-local disk)."""
    script = 'hostname "$0" && exec "$@"'
    if hide is not None:
        script = f'mount -t tmpfs tmpfs "{hide}" && {script}'
    return ["unshare", "--mount", "--uts", "sh", "-c", script, hostname, *cmd]


def run_ranks(cmds: list[list[str]], envs: list[dict], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Start every rank, wait for all. A rank still running after `timeout` is sent SIGABRT, which Python's
    faulthandler (PYTHONFAULTHANDLER, set by child_env) answers with every thread's stack: the failure shows
    where each rank was, not only that it did not end."""
    procs = [subprocess.Popen(c, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c, e in zip(cmds, envs)]
    deadline, out = time.monotonic() + timeout, []
    for p in procs:
        try:  # communicate, not wait: a rank must never block on a full pipe
            stdout, stderr = p.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    else:
        return out
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGABRT)
    report = []
    for r, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=30) if r >= len(out) else (out[r].stdout, out[r].stderr)
        report.append(f"--- rank {r} (exit {p.returncode}) ---\n{stdout[-2000:]}{stderr[-6000:]}")
    pytest.fail(f"a rank did not end within {timeout}s; each rank's output, stacks last:\n" + "\n".join(report))
