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

    def __init__(self, d, fmt: str, template: str | None, specials: dict, eot_id: int | None,
                 label: str | None = None, locate=None):
        """`label`: the template as an error line names it; `locate(position)`: where record `position` is in the
        input (`file:line`), asked only for an error."""
        self.d, self.fmt, self.template, self.specials, self.eot_id = d, fmt, template, specials, eot_id
        self.label = label or "the chat template"
        self.locate = locate or (lambda position: f"--data.source={d.source}, record {position}")

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


def chunk_arrays(ids: list[np.ndarray], supervised: list[bool], n_pieces: list[int]):
    """The pieces' ids of a chunk of samples -> (tokens int64, flags uint8, sample starts, sample ends): one
    array op per chunk rather than several per sample. flags = LOSS on supervised pieces, START (never LOSS) on
    each sample's first token: nothing of its own sample predicts it."""
    lengths = np.fromiter((len(i) for i in ids), np.int64, len(ids))
    tokens = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
    flags = np.repeat(np.where(supervised, LOSS, 0).astype(np.uint8), lengths)
    piece_ends = np.concatenate([[0], np.cumsum(lengths)])
    ends = piece_ends[np.cumsum(n_pieces, dtype=np.int64)]
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    flags[starts[ends > starts]] = START
    return tokens, flags, starts, ends


def encode_samples(tok, renderer: Renderer, records: list, labels: list[str], first: int, block_size: int,
                   overlong: str) -> dict:
    """A chunk of records -> {split: (samples [(tokens, flags)], counts)}, each sample cut to the block or dropped
    (module docstring). Runs in a worker thread."""
    texts, supervised, n_pieces = [], [], []
    for i, record in enumerate(records):
        try:
            pieces = renderer.pieces(record)
        except chat.TemplateFailed as exc:
            raise UserError(f"{renderer.label}: {exc} (on {renderer.locate(first + i)})") from None
        except ValueError as exc:
            raise UserError(f"{renderer.locate(first + i)}: {exc}") from None
        texts += [text for text, _ in pieces]
        supervised += [sup for _, sup in pieces]
        n_pieces.append(len(pieces))
    tokens, flags, starts, ends = chunk_arrays(tok.encode_arrays(texts), supervised, n_pieces)
    labelled = (flags & LOSS) != 0
    # running counts: labels (and end-of-turn labels) in tokens[s:e] = cum[e] - cum[s]
    lab = np.concatenate([[0], np.cumsum(labelled)]).tolist()
    eot = np.concatenate([[0], np.cumsum(labelled & (tokens == renderer.eot_id))]).tolist() \
        if renderer.eot_id is not None else [0] * len(lab)
    out = {split: ([], dict.fromkeys(COUNTERS, 0)) for split in set(labels)}
    for s, e, label in zip(starts.tolist(), ends.tolist(), labels):
        samples, counts = out[label]
        counts["samples"] += 1
        if e - s > block_size:
            e = s + block_size  # truncated: the head kept, the prompt first
            if overlong == "drop" or lab[e] == lab[s]:  # dropped, or its prompt alone fills the block
                counts["dropped_overlong"] += 1
                continue
            counts["truncated"] += 1
        if lab[e] == lab[s]:
            counts["dropped_unsupervised"] += 1
            continue
        samples.append((tokens[s:e], flags[s:e]))
        counts["n_supervised"] += lab[e] - lab[s]
        counts["eot_supervised"] += eot[e] - eot[s]
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
