"""Helpers for real multi-process runs: `distclm` under torchrun with the gloo backend on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "distclm" / "torch_extensions"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def distclm_cmd(nproc: int, command: str, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "distclm.cli", command, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "distclm.cli", command, *args]


def run_distclm(nproc: int, command: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(distclm_cmd(nproc, command, args), env=child_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"distclm {command} on {nproc} process(es) failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """step -> record (the last record of a repeated step counts)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] == kind:
            out[r["step"]] = r
    return out


class Runs:
    """Session cache of training runs keyed by (nproc, args)."""

    def __init__(self, root: Path, data: Path):
        self.root, self.data, self.cache = root, data, {}

    def train(self, nproc: int, *args: str) -> Path:
        key = (nproc, args)
        if key not in self.cache:
            run_dir = self.root / f"run{len(self.cache)}"
            run_distclm(nproc, "train", [f"--data.dir={self.data}", "--model.name=gpt2-tiny", f"--run.dir={run_dir}",
                                         "--log.every_steps=1", *args])
            self.cache[key] = run_dir
        return self.cache[key]
