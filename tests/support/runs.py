"""Reading a run dir back (through the files the contract names), and the training runs several tests share."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.cli import run_cli

# ---------------------------------------------------------------------------------------------
# The run constants of the suite, in one place: the shared runs' table and the argument groups tests reuse.

# 6 steps, global batch 8 blocks of 64 tokens; lr high enough that the weights move visibly.
EQUIV = ("--train.max_steps=6", "--train.lr=1e-3", "--train.warmup_steps=2", "--train.seed=3", "--eval.max_blocks=16")
# The world-size parity runs: a GPT-2 with dropout 0.1 (as DistilGPT2) and attention within documents, so
# that 1 vs 2 processes and every ZeRO stage are compared with both on.
PARITY = (*EQUIV, "--model.name={dropout_gpt2}", "--train.doc_attention=within")
# 20 steps, checkpoint at 10 and 20, block ids logged: the reference of every resume test.
CKPT = ("--train.max_steps=20", "--train.lr=1e-3", "--train.warmup_steps=5", "--train.seed=3",
        "--train.save_every=10", "--log.block_ids=true", "--eval.max_blocks=16")
TWO, ONE = ("--train.micro_batch_size=4",), ("--train.micro_batch_size=8",)  # global batch 8 on 2 and on 1 process

SHARED = {
    "equiv-1proc": (1, (*EQUIV, *ONE)),
    "equiv-1proc-accum2": (1, (*PARITY, "--train.micro_batch_size=4", "--train.grad_accum=2")),
    "equiv-ddp-2proc": (2, (*PARITY, *TWO)),
    **{f"equiv-{s}-2proc": (2, (*PARITY, *TWO, f"--train.strategy={s}")) for s in ("zero1", "zero2", "zero3")},
    **{f"equiv-{s}-offload-2proc": (2, (*PARITY, *TWO, f"--train.strategy={s}", "--train.offload=optimizer"))
       for s in ("zero2", "zero3")},
    "equiv-1proc-act-ckpt": (1, (*EQUIV, *ONE, "--train.activation_checkpointing=true")),
    "equiv-1proc-compile": (1, (*EQUIV, *ONE, "--train.compile=true")),
    **{f"ckpt-{s}-2proc": (2, (*CKPT, *TWO, f"--train.strategy={s}")) for s in ("ddp", "zero2", "zero3")},
    "faults-1proc-30": (1, ("--train.micro_batch_size=4", "--train.lr=1e-3", "--train.seed=3",
                            "--log.interval_s=1000", "--train.max_steps=30", "--eval.max_blocks=16")),
    "launch-torchrun-ddp": (2, ("--train.max_steps=3", "--train.micro_batch_size=4", "--train.lr=1e-3",
                                "--train.seed=3", "--eval.max_blocks=16")),
}


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


def global_order(run_dir: Path, micro: int) -> dict[int, list[int]]:
    """step -> the global batch's block ids in order, rebuilt from every rank's block_ids file whatever the world
    size of the launch that ran the step: micro-batch j of accumulation round k on rank r is j = k x world + r."""
    per_rank = {int(p.stem.rsplit("rank", 1)[1]): block_ids(run_dir, int(p.stem.rsplit("rank", 1)[1]))
                for p in Path(run_dir).glob("block_ids-rank*.txt")}
    out = {}
    for step in sorted({s for ids in per_rank.values() for s in ids}):
        ranks = [per_rank[r][step] for r in sorted(per_rank) if step in per_rank[r]]
        accum = len(ranks[0]) // micro
        out[step] = [i for k in range(accum) for ids in ranks for i in ids[k * micro:(k + 1) * micro]]
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

    def __init__(self, root: Path, data: Path, table: dict[str, tuple[int, tuple[str, ...]]], **places):
        self.root, self.data, self.table, self.places, self.done = root, data, table, places, {}

    def get(self, name: str) -> Path:
        """The run dir of run `name` (its arguments may name {places} given at construction, e.g. a model folder)."""
        if name not in self.done:
            nproc, args = self.table[name]
            places = {k: v() if callable(v) else v for k, v in self.places.items()}
            train(nproc, self.root / name, self.data, *(a.format(**places) for a in args))
            self.done[name] = self.root / name
        return self.done[name]
