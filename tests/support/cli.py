"""Running `distclm` as a real process (stdout a pipe, not a terminal): on one process, or under torchrun."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.env import REPO, child_env


@dataclass
class Result:
    code: int
    out: str
    err: str

    def error_line(self) -> str:
        """The one line a user error must produce (asserts it is one line, exit 2, no traceback)."""
        lines = self.err.strip().splitlines()
        assert self.code == 2, (self.code, self.out, self.err)
        assert len(lines) == 1, self.err
        assert "Traceback" not in self.err
        assert lines[0].startswith("distclm: error: "), lines[0]
        return lines[0]


def free_port() -> int:
    from distclm.dist import free_port as port

    return port()


def command(command: str, args, nproc: int = 1) -> list[str]:
    """The argv of `distclm COMMAND ARGS` on `nproc` processes (torchrun on 127.0.0.1 when more than one)."""
    args = [str(a) for a in args]
    if nproc == 1:
        return [sys.executable, "-m", "distclm.cli", command, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "distclm.cli", command, *args]


def run_cli(cmd: str, *args, nproc: int = 1, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 600, check: bool = False) -> Result:
    """Run `distclm CMD ARGS` to the end -> Result; `check`: fail the test (with the output) unless it exits 0."""
    proc = subprocess.run(command(cmd, args, nproc), env=env or child_env(), cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout)
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    if check and result.code != 0:
        raise AssertionError(f"distclm {cmd} on {nproc} process(es) failed ({result.code}):\n"
                             f"{result.out[-3000:]}\n{result.err[-6000:]}")
    return result


def start_cli(cmd: str, *args, nproc: int = 1, env: dict | None = None) -> subprocess.Popen:
    """Start `distclm CMD ARGS` in the background (for tests that signal or kill it)."""
    return subprocess.Popen(command(cmd, args, nproc), env=env or child_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


class Lines:
    """A process's stdout and stderr read as they come, each line with the time it arrived."""

    def __init__(self, proc):
        self.lines: list[tuple[float, str]] = []
        self._threads = [threading.Thread(target=self._read, args=(pipe,), daemon=True)
                         for pipe in (proc.stdout, proc.stderr)]
        for t in self._threads:
            t.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append((time.time(), line.rstrip("\n")))

    def wait_for(self, pattern: str, timeout: float) -> tuple[float, re.Match]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for t, line in list(self.lines):
                if m := re.search(pattern, line):
                    return t, m
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n" +
                             "\n".join(line for _, line in self.lines[-40:]))

    def text(self) -> str:
        for t in self._threads:
            t.join(timeout=10)
        return "\n".join(line for _, line in self.lines)
