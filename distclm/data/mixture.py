"""Several prepared folders trained on as one weighted mixture: --data.dir=a,b --data.weights=0.7,0.3.

The folders must share the tokenizer and the block size (one model reads them all). Train blocks come from
MixtureSampler (loader.py); eval reports each folder's perplexity and the weighted one:

    loss = sum_f w_f loss_f   (w normalised)        perplexity = exp(loss)

A single folder is no mixture: BlockSampler and its order, exactly as without this module.
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction

from distclm.errors import UserError


def weights(cfg, n: int) -> list[str]:
    """--data.weights for `n` folders (equal when not given), each a positive number, as exact decimal strings."""
    raw = cfg.data.weights
    if raw in (None, "", "none"):
        return ["1"] * n
    parts = [w.strip() for w in str(raw).split(",") if w.strip()]
    if n == 1:
        raise UserError(f"--data.weights={raw}: weights mix several folders; give --data.dir=a,b,... or drop it")
    if len(parts) != n:
        raise UserError(f"--data.weights={raw}: {len(parts)} weight(s) for {n} folders in --data.dir; give one each")
    try:
        if all(Fraction(w) > 0 for w in parts):
            return parts
    except ValueError:
        pass
    raise UserError(f"--data.weights={raw}: expected positive numbers, e.g. --data.weights=0.7,0.3")


def check_same_tokens(readers) -> None:
    """One tokenizer and one block size for every folder, or one line naming the folder that differs."""
    first = readers[0]
    for r in readers[1:]:
        if r.manifest["tokenizer"].get("sha256") != first.manifest["tokenizer"].get("sha256"):
            raise UserError(f"--data.dir: {r.folder} was tokenized with {r.manifest['tokenizer'].get('name')} but "
                            f"{first.folder} with {first.manifest['tokenizer'].get('name')} (another vocabulary); "
                            f"prepare every folder of a mixture with the same --data.tokenizer")
        if r.block_size != first.block_size:
            raise UserError(f"--data.dir: {r.folder} has blocks of {r.block_size} tokens but {first.folder} of "
                            f"{first.block_size}; prepare every folder of a mixture with the same --data.block_size")


def fingerprint(readers, ws: list[str]) -> str:
    """What a checkpoint records of the data: one folder's fingerprint, or the mixture's (folders + weights)."""
    prints = [r.manifest["source"].get("fingerprint") for r in readers]
    if len(prints) == 1:
        return prints[0]
    return hashlib.sha256(json.dumps({"folders": prints, "weights": ws}).encode()).hexdigest()


def combine(results: list[tuple[str, dict]], ws: list[str]) -> dict:
    """Per-folder eval results -> the weighted loss and perplexity, with each folder's under "by_dir"."""
    import math

    total = sum(float(w) for w in ws)
    loss = sum(float(w) / total * r["loss"] for w, (_, r) in zip(ws, results))
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": sum(r["tokens"] for _, r in results),
            "blocks": sum(r["blocks"] for _, r in results), "world_size": results[0][1]["world_size"],
            "by_dir": {name: {k: r[k] for k in ("loss", "perplexity", "tokens", "blocks")} for name, r in results}}
