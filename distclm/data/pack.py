"""Concatenate documents into one token stream and cut it into fixed blocks.

The tutorial's `group_texts` drops a remainder per `map` batch per worker, so its blocks depend
on batch size and worker count. Here the remainder is carried into the next batch: the blocks are
a pure function of the document stream, and at most one tail (< block_size tokens) per split is
dropped, and recorded in the manifest.
"""

from __future__ import annotations

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds every id when vocab_size <= 65536 (GPT-2: max id 50256 < 2**16), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def concat_docs(docs: list[list[int]] | list[np.ndarray], eos: int | None, dtype: np.dtype) -> np.ndarray:
    """Documents (id lists or arrays) -> one flat array, `eos` after each document when given. Shape (n_tokens,)."""
    # Arrays are joined by np.concatenate (a copy per document, no Python int per token); lists become int64 first.
    parts = [d if isinstance(d, np.ndarray) else np.array(d, dtype=np.int64) for d in docs]
    if eos is not None:
        fits = parts and np.can_cast(np.min_scalar_type(eos), parts[0].dtype)
        tail = np.array([eos], dtype=parts[0].dtype if fits else np.int64)
        parts = [p for d in parts for p in (d, tail)]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    count = len(flat)
    limit = np.iinfo(dtype).max
    if count and (flat.max() > limit or flat.min() < 0):
        raise ValueError(f"token id {int(flat.max())} does not fit in {dtype}; the vocabulary is larger than declared")
    return flat.astype(dtype, copy=False)


class Packer:
    """Feeds a token stream, returns whole blocks, keeps the remainder for the next feed."""

    def __init__(self, block_size: int, dtype: np.dtype, carry: np.ndarray | None = None):
        self.block_size = block_size
        self.carry = np.zeros(0, dtype) if carry is None else np.asarray(carry, dtype)

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        """Shape (n_blocks, block_size) of the blocks completed by `tokens`."""
        stream = np.concatenate([self.carry, tokens]) if len(self.carry) else tokens
        n_blocks = len(stream) // self.block_size
        cut = n_blocks * self.block_size
        self.carry = stream[cut:].copy()
        return stream[:cut].reshape(n_blocks, self.block_size)

    @property
    def dropped(self) -> int:
        """Tokens that would be dropped if the stream ended now (< block_size)."""
        return len(self.carry)
