"""Chat / prompt_completion records -> whole samples (tokens + LOSS/START flags) -> bin-packed blocks.

    record -> pieces (chat.py) -> tokens, one piece at a time; flags[t] = LOSS on supervised pieces' tokens
           -> the first token: START, never LOSS (nothing in the sample predicts it)
           -> longer than the block: truncated (the head kept: prompt first, the answer cut) or dropped
           -> no LOSS token left: dropped, counted
    samples (document order, main thread) -> first fit over a window of W open blocks -> the oldest open block
           is padded and written when a sample fits none and the window is full

A sample never crosses a block. Padding is the EOS id with flags START (first pad) then 0: never a label, its
own segment. Packing runs on the main thread in document order, so the blocks are a function of the records
and the settings only (any worker count gives the same bytes); memory is W blocks.
"""

from __future__ import annotations

import numpy as np

from distclm.data import chat
from distclm.data.blocks import LOSS, START
from distclm.errors import UserError

WINDOW = 16  # open blocks a sample may go into: more packs tighter, each costs one block of memory

COUNTERS = ("samples", "truncated", "dropped_overlong", "dropped_unsupervised", "n_supervised", "eot_supervised")


class Renderer:
    """What turns one record into pieces: the format, field names, template and its special strings."""

    def __init__(self, d, fmt: str, template: str | None, specials: dict, eot_id: int | None):
        self.d, self.fmt, self.template, self.specials, self.eot_id = d, fmt, template, specials, eot_id

    def pieces(self, record) -> list[tuple[str, bool]]:
        d = self.d
        if not isinstance(record, dict):
            raise ValueError("a record must be a JSON object")
        if self.fmt == "chat":
            if d.messages_field not in record:
                raise ValueError(f"field {d.messages_field!r} missing (--data.messages_field)")
            return chat.chat_pieces(record[d.messages_field], self.template, self.specials, d.train_on)
        for name, flag in ((d.prompt_field, "prompt_field"), (d.completion_field, "completion_field")):
            if name not in record:
                raise ValueError(f"field {name!r} missing (--data.{flag})")
        return chat.completion_pieces(record[d.prompt_field], record[d.completion_field],
                                      self.specials["eos_token"], d.train_on)


def sample_arrays(ids: list[np.ndarray], supervised: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """One sample's pieces' token ids -> (tokens int64 (L,), flags uint8 (L,))."""
    tokens = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
    flags = np.concatenate([np.full(len(i), LOSS if s else 0, np.uint8) for i, s in zip(ids, supervised)]) \
        if ids else np.zeros(0, np.uint8)
    if len(flags):
        flags[0] = START  # predicted from nothing of its own sample: never a label
    return tokens, flags


def fit(tokens: np.ndarray, flags: np.ndarray, block_size: int, overlong: str, counts: dict):
    """A sample cut to the block (or None when dropped), counted in `counts`."""
    if len(tokens) > block_size:
        if overlong == "drop":
            counts["dropped_overlong"] += 1
            return None
        tokens, flags = tokens[:block_size], flags[:block_size]
        if not (flags & LOSS).any():  # its prompt alone fills the block
            counts["dropped_overlong"] += 1
            return None
        counts["truncated"] += 1
    if not (flags & LOSS).any():
        counts["dropped_unsupervised"] += 1
        return None
    return tokens, flags


def encode_samples(tok, renderer: Renderer, records: list, labels: list[str], first: int, block_size: int,
                   overlong: str) -> dict:
    """A chunk of records -> {split: (samples [(tokens, flags)], counts)}. Runs in a worker thread."""
    texts, owners = [], []
    for i, record in enumerate(records):
        try:
            pieces = renderer.pieces(record)
        except ValueError as exc:
            raise UserError(f"--data.source={renderer.d.source}, record {first + i}: {exc}") from None
        texts += [text for text, _ in pieces]
        owners.append([sup for _, sup in pieces])
    ids = tok.encode_arrays(texts)
    out = {split: ([], dict.fromkeys(COUNTERS, 0)) for split in set(labels)}
    at = 0
    for sup, label in zip(owners, labels):
        tokens, flags = sample_arrays(ids[at:at + len(sup)], sup)
        at += len(sup)
        samples, counts = out[label]
        counts["samples"] += 1
        kept = fit(tokens, flags, block_size, overlong, counts)
        if kept is not None:
            samples.append(kept)
            labelled = kept[1] & LOSS != 0
            counts["n_supervised"] += int(labelled.sum())
            if renderer.eot_id is not None:
                counts["eot_supervised"] += int((kept[0][labelled] == renderer.eot_id).sum())
    return out


class SamplePacker:
    """First fit of whole samples into a window of open blocks; see the module docstring."""

    def __init__(self, block_size: int, dtype: np.dtype, pad_id: int, window: int = WINDOW, state=None):
        self.block_size, self.dtype, self.pad_id, self.window = block_size, dtype, pad_id, window
        # Open blocks, oldest first: [tokens (T,), flags (T,), tokens used]; a new one starts as padding.
        self.open = []
        for tokens, flags in state or []:
            block = self._new()
            block[0][:len(tokens)], block[1][:len(flags)], block[2] = tokens, flags, len(tokens)
            self.open.append(block)

    def _new(self) -> list:
        return [np.full(self.block_size, self.pad_id, dtype=self.dtype), np.zeros(self.block_size, np.uint8), 0]

    def feed(self, samples: list) -> tuple[np.ndarray, np.ndarray]:
        """Samples (each no longer than the block) -> the blocks closed by them: (n, T) tokens and flags."""
        done = []
        for tokens, flags in samples:
            n = len(tokens)
            slot = next((i for i, b in enumerate(self.open) if b[2] + n <= self.block_size), None)
            if slot is None:
                if len(self.open) == self.window:
                    done.append(self.open.pop(0))
                self.open.append(self._new())
                slot = len(self.open) - 1
            block = self.open[slot]
            block[0][block[2]:block[2] + n], block[1][block[2]:block[2] + n] = tokens, flags
            block[2] += n
            if block[2] == self.block_size:
                done.append(self.open.pop(slot))
        return self._pad(done)

    def flush(self) -> tuple[np.ndarray, np.ndarray]:
        """The open blocks, padded: at the end of the split."""
        done, self.open = self.open, []
        return self._pad(done)

    def _pad(self, blocks: list) -> tuple[np.ndarray, np.ndarray]:
        t = np.empty((len(blocks), self.block_size), dtype=self.dtype)
        f = np.empty((len(blocks), self.block_size), dtype=np.uint8)
        for row, (tokens, flags, used) in enumerate(blocks):
            t[row], f[row] = tokens, flags
            if used < self.block_size:
                f[row, used] = START  # the padding is a segment of its own
        return t, f

    def state(self) -> list:
        return [[b[0][:b[2]].tolist(), b[1][:b[2]].tolist()] for b in self.open]
