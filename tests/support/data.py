"""Real text available offline, and reading a prepared folder through the contract only (not distclm's reader).

Reference numbers are computed the simple way (tokenize every document with the HF tokenizer, concatenate,
cut), so that the streaming, threaded, resumable prepare is checked against an obviously right answer.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

PYDOC_ARGS = ["--data.source=pydoc", "--data.shard_blocks=100", "--data.block_size=128"]
BIG_ARGS = ["--data.shard_blocks=256", "--data.block_size=128"]


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
    """The files that must be byte-identical across worker counts: shards + manifest + the saved tokenizer/ (not
    prepare.yaml)."""
    folder = Path(folder)
    out = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
           if p.name == "manifest.json" or p.suffix == ".bin"}
    tok = folder / "tokenizer"
    return out | ({f"tokenizer/{p.name}": p.read_bytes() for p in sorted(tok.iterdir())} if tok.is_dir() else {})


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
