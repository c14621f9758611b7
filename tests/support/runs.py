"""Reading a run dir back (through the files the contract names), and the training runs several tests share."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.cli import run_cli


def read_metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    """step -> record (the last record of a repeated step counts)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] == kind:
            out[r["step"]] = r
    return out


def block_ids(run_dir: Path, rank: int) -> dict[int, list[int]]:
    """step -> the block ids that rank trained on (the last line of a repeated step counts)."""
    out = {}
    for line in (Path(run_dir) / f"block_ids-rank{rank}.txt").read_text().splitlines():
        step, *ids = map(int, line.split())
        out[step] = ids
    return out


def weights(folder: Path) -> dict:
    """All tensors of a Hugging Face folder's safetensors files (torch tensors)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def train(nproc: int, run_dir: Path, data: Path, *args, model: str = "gpt2-tiny", **kw):
    """`distclm train` into `run_dir` (log every step); fails the test unless it exits 0."""
    return run_cli("train", f"--data.dir={data}", f"--model.name={model}", f"--run.dir={run_dir}",
                   "--log.every_steps=1", *args, nproc=nproc, check=True, **kw)


class SharedRuns:
    """Training runs that several tests read, each under a NAME bound to one command in `table`.

    A test asks for a run by name (`shared.get("ddp-2proc")`); the first ask trains it, later asks reuse it.
    Two tests share a run only by naming the same entry, never by happening to pass the same arguments.
    """

    def __init__(self, root: Path, data: Path, table: dict[str, tuple[int, tuple[str, ...]]]):
        self.root, self.data, self.table, self.done = root, data, table, {}

    def get(self, name: str) -> Path:
        if name not in self.done:
            nproc, args = self.table[name]
            train(nproc, self.root / name, self.data, *args)
            self.done[name] = self.root / name
        return self.done[name]
