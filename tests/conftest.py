"""Shared helpers for the distclm tests: real text, the CLI in and out of process, reference packing.

Everything runs offline and without /work/shared: the text is Python's own `pydoc_data.topics`
(what `--data.source=pydoc` reads) or small files written into tmp_path. Reference numbers are
computed here the simple way (tokenize every document with the HF tokenizer, concatenate, cut)
so that the streaming, threaded, resumable prepare is checked against an obviously right answer.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Offline and deterministic wherever the suite runs: no hub probe, no user cache that could hold a
# real `gpt2` download and make the "hub id offline" tests pass for the wrong reason.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(tempfile.gettempdir(), f"distclm-tests-hf-home-{os.getpid()}")
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def pydoc_texts() -> list[str]:
    """The documents of `--data.source=pydoc`, in its order (topics sorted by name)."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Running the CLI


@dataclass
class Result:
    code: int
    out: str
    err: str

    def error_line(self) -> str:
        """The one line a user error must produce (asserts it is one line, no traceback)."""
        lines = self.err.strip().splitlines()
        assert self.code == 2, (self.code, self.out, self.err)
        assert len(lines) == 1, self.err
        assert "Traceback" not in self.err
        assert lines[0].startswith("distclm: error: "), lines[0]
        return lines[0]


@pytest.fixture
def cli(capsys):
    """Run `distclm ARGS` in this process: -> Result(exit code, stdout, stderr)."""
    from distclm.cli import main

    def run(*args) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(*args, cwd: Path | None = None, env: dict | None = None, timeout: float = 120) -> Result:
    """Run `python -m distclm.cli ARGS` as a real process (stdout is a pipe, not a terminal)."""
    proc = subprocess.run([sys.executable, "-m", "distclm.cli", *map(str, args)], cwd=cwd,
                          env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------------------------------------
# Reading a prepared folder through the contract only (not through distclm's reader)


def manifest_of(folder: Path) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))


def read_split(folder: Path, split: str) -> np.ndarray:
    """All blocks of a split, shape (n_blocks, block_size), read with np.memmap as DESIGN.md says."""
    m = manifest_of(folder)
    parts = [np.memmap(Path(folder) / s["file"], dtype=m["dtype"], mode="r").reshape(-1, m["block_size"])
             for s in m["splits"][split]["shards"]]
    if not parts:
        return np.zeros((0, m["block_size"]), dtype=m["dtype"])
    return np.concatenate(parts)


def output_bytes(folder: Path) -> dict[str, bytes]:
    """The files that must be byte-identical across worker counts: shards + manifest (not prepare.yaml)."""
    folder = Path(folder)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name == "manifest.json" or p.suffix == ".bin"}


# ---------------------------------------------------------------------------------------------
# The obviously right answer


@pytest.fixture(scope="session")
def hf_gpt2():
    """The vendored GPT-2 tokenizer as transformers loads it (the reference for every id)."""
    from distclm.data.tokenize import load_hf_tokenizer

    return load_hf_tokenizer("gpt2")[0]


def encode_all(hf, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, one by one through transformers (no distclm code involved)."""
    return hf(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def reference_split(ids: list[list[int]], eos: int | None, block_size: int) -> dict:
    """Concatenate the split's documents (EOS after each when given), cut into blocks, drop the tail."""
    docs = [d for d in ids if d]  # empty documents contribute nothing
    stream = [t for d in docs for t in (d + ([eos] if eos is not None else []))]
    n_blocks = len(stream) // block_size
    blocks = np.array(stream[:n_blocks * block_size], dtype=np.int64).reshape(n_blocks, block_size)
    return {"blocks": blocks, "n_tokens": len(stream), "n_docs": len(docs),
            "dropped_tokens": len(stream) - n_blocks * block_size, "n_blocks": n_blocks}


def reference(ids: list[list[int]], labels: list[str], eos: int | None, block_size: int) -> dict:
    return {split: reference_split([d for d, lab in zip(ids, labels) if lab == split], eos, block_size)
            for split in ("train", "validation")}


def assert_matches_reference(folder: Path, ref: dict) -> None:
    m = manifest_of(folder)
    for split, r in ref.items():
        s = m["splits"][split]
        got = read_split(folder, split)
        assert got.shape == r["blocks"].shape, split
        np.testing.assert_array_equal(got.astype(np.int64), r["blocks"], err_msg=split)
        assert (s["n_tokens"], s["n_docs"], s["dropped_tokens"], s["n_blocks"]) == \
            (r["n_tokens"], r["n_docs"], r["dropped_tokens"], r["n_blocks"]), split
        assert s["dropped_tokens"] < m["block_size"]


def carved_labels(n: int, seed: int, val_fraction: float) -> list[str]:
    """The per-document split prepare promises: a seeded function of the document's position."""
    from distclm.data.prepare import split_of

    return [split_of(i, seed, val_fraction) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Prepared folders shared by many tests (treat as read-only; copy before damaging one)

PYDOC_ARGS = ["--data.source=pydoc", "--data.shard_blocks=100", "--data.block_size=128"]


@pytest.fixture(scope="session")
def pydoc_prepared(tmp_path_factory) -> Path:
    """`prepare --data.source=pydoc` with small shards: ~139 K tokens, 10 train + 2 validation shards."""
    from distclm.cli import main

    out = tmp_path_factory.mktemp("pydoc") / "prepared"
    assert main(["prepare", *PYDOC_ARGS, f"--data.dir={out}"]) == 0
    return out


@pytest.fixture(scope="session")
def big_corpus(tmp_path_factory) -> Path:
    """A ~10 MB jsonl: the pydoc topics 20 times over (1,580 documents, ~2.8 M tokens)."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    texts = pydoc_texts()
    write_jsonl(path, [{"id": f"{r}-{i}", "text": f"Copy {r}. {t}"} for r in range(20) for i, t in enumerate(texts)])
    return path


BIG_ARGS = ["--data.shard_blocks=256", "--data.block_size=128"]


@pytest.fixture(scope="session")
def big_prepared(big_corpus, tmp_path_factory) -> Path:
    """The big corpus prepared without interruption (2 workers): ~5.6 MB of shards in ~90 files."""
    from distclm.cli import main

    out = tmp_path_factory.mktemp("bigprep") / "prepared"
    assert main(["prepare", f"--data.source={big_corpus}", *BIG_ARGS, "--data.num_workers=2",
                 f"--data.dir={out}"]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Fixtures of the multi-process tests (tests/dist, tests/multinode). Their helpers live in
# tests/dist/distrun.py; one conftest for the whole suite, so `from conftest import ...` is unambiguous.

sys.path.insert(0, str(ROOT / "tests" / "dist"))
from distrun import REPO, Runs, child_env  # noqa: E402


@pytest.fixture(scope="session")
def pydoc_blocks(tmp_path_factory) -> Path:
    """The embedded pydoc corpus prepared in 64-token blocks (~2,000 train blocks)."""
    out = tmp_path_factory.mktemp("pydoc64")
    proc = subprocess.run([sys.executable, "-m", "distclm.cli", "prepare", "--data.source=pydoc",
                           f"--data.dir={out}", "--data.block_size=64", "--data.val_fraction=0.1"],
                          env=child_env(), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def runs(tmp_path_factory, pydoc_blocks) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), pydoc_blocks)
