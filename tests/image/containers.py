"""Helpers of `make image-test`: the engine, PASS/FAIL lines, a run's per-step losses."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path


def engine() -> str:
    """docker or podman, as docker/engine.sh chose (podman also gets its CONTAINERS_CONF from there)."""
    return os.environ.get("ENGINE", "podman")


def run_logged(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run and capture; the command line goes to stderr so a failure can be replayed by hand."""
    print("  $ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def wait_for(condition, timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False


def losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} of metrics.jsonl's training records; the last record of a step counts (a resumed run
    appends the steps it repeats)."""
    path = run_dir / "metrics.jsonl"
    out: dict[int, float] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if rec.get("type") == "train":
            out[rec["step"]] = rec["loss"]
    return out


class Checks:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []
        self.started = time.monotonic()

    def check(self, name: str, ok: bool, detail: str) -> bool:
        took = time.monotonic() - self.started
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}  [{took:.0f} s]", flush=True)
        self.results.append((name, ok, detail))
        return ok

    def note(self, text: str) -> None:
        print(f"      {text}", flush=True)

    def summary(self, seconds: float) -> int:
        failed = [n for n, ok, _ in self.results if not ok]
        print(f"image-test: {len(self.results) - len(failed)} passed, {len(failed)} failed in {seconds:.0f} s"
              + (f" (failed: {'; '.join(failed)})" if failed else ""), flush=True)
        return 1 if failed or not self.results else 0
