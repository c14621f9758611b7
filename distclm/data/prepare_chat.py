"""The chat / prompt_completion side of `distclm prepare`: format, template, and per-split packing of samples.

prepare.py streams records through the same pool and resume state as text; here are the parts that differ:
which format and template (both part of the fingerprint), how a chunk is encoded (samples.py), and how the
samples of a split become blocks (first-fit packing instead of cutting a token stream) and a version-2
manifest entry with the packing report.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np

from distclm.data import chat, sources
from distclm.data.blocks import VERSION_MASKED, SplitWriter
from distclm.data.samples import COUNTERS, Renderer, SamplePacker
from distclm.errors import UserError


def resolve_format(d, specs) -> str:
    """--data.format, or for auto the format of the first record of the first source."""
    if d.format != "auto":
        return d.format
    spec = specs[0][1]
    first = next(islice(sources.records(spec), 1), None)
    return chat.detect_format(first, d) if first is not None else "text"


class ChatData:
    """The resolved format and template of a chat / prompt_completion prepare."""

    def __init__(self, d, fmt: str, tok, specs=()):
        """`specs`: the source streams in order ((split, SourceSpec) pairs), to name the file and line of a bad
        record."""
        self.fmt = fmt
        specials = {"eos_token": tok.special_text(tok.eos_token_id), "bos_token": tok.bos_token}
        label = None
        if fmt == "chat":
            self.template, self.origin = chat.resolve_template(d.chat_template, tok.chat_template())
            label = chat.template_label(d, self.origin)
            try:  # the template's first rendering: a syntax error, or one on any conversation, stops here
                tail, eot = chat.end_of_turn(self.template, specials, lambda text: tok.encode_arrays([text])[0])
            except chat.TemplateFailed as exc:
                raise UserError(f"{label}: {exc}") from None
        else:
            self.template, self.origin = None, None
            tail, eot = specials["eos_token"], tok.eos_token_id
        self.end_of_turn = {"text": tail, "id": eot}
        streams = [spec for _, spec in specs]
        self.renderer = Renderer(d, fmt, self.template, specials, eot, label,
                                 lambda position: sources.locate(streams, position))

    def settings(self, d) -> dict:
        """What decides the bytes beyond the text path's settings (the template by its hash)."""
        return {"data_format": self.fmt, "messages_field": d.messages_field, "prompt_field": d.prompt_field,
                "completion_field": d.completion_field, "chat_template_sha256": chat.template_sha256(self.template),
                "train_on": d.train_on, "overlong": d.overlong}

    def manifest(self, d) -> dict:
        return {"version": VERSION_MASKED, "data_format": self.fmt, "train_on": d.train_on, "overlong": d.overlong,
                "chat_template": self.template, "chat_template_sha256": chat.template_sha256(self.template),
                "chat_template_origin": self.origin, "end_of_turn": self.end_of_turn}


class SampleSplits:
    """The train and validation outputs of a chat prepare: a SamplePacker and a masked SplitWriter each
    (the interface of prepare.Splits: feed, save_state's state, finish)."""

    def __init__(self, out: Path, d, dtype: np.dtype, pad_id: int, state: dict | None):
        self.writers, self.packers, self.counts = {}, {}, {}
        for split in ("train", "validation"):
            saved = (state or {}).get("splits", {}).get(split, {})
            self.writers[split] = SplitWriter(out, split, d.block_size, dtype, d.shard_blocks,
                                              shards=saved.get("shards", []), open_blocks=saved.get("open_blocks", 0),
                                              n_docs=saved.get("n_docs", 0), n_tokens=saved.get("n_tokens", 0),
                                              masks=True)
            self.packers[split] = SamplePacker(d.block_size, dtype, pad_id, state=saved.get("open"))
            self.counts[split] = {k: saved.get("counts", {}).get(k, 0) for k in COUNTERS}
        self.docs = self.bytes = 0

    def feed(self, encoded: dict) -> bool:
        completed = False
        for split, (samples, counts) in encoded.items():
            w = self.writers[split]
            for k, v in counts.items():
                self.counts[split][k] += v
            w.n_docs += len(samples)
            w.n_tokens += sum(len(t) for t, _ in samples)  # real tokens: the padding is not counted
            blocks, flags = self.packers[split].feed(samples)
            completed |= w.write(blocks, flags)
            self.bytes += blocks.nbytes
            self.docs += counts["samples"]
        return completed

    @property
    def tokens(self) -> int:
        return sum(w.n_tokens for w in self.writers.values())

    def state(self) -> dict:
        return {k: {**w.state(), "open": self.packers[k].state(), "counts": self.counts[k]}
                for k, w in self.writers.items()}

    def finish(self) -> dict:
        out = {}
        for split, w in self.writers.items():
            blocks, flags = self.packers[split].flush()
            w.write(blocks, flags)
            w.finish()
            c = self.counts[split]
            # packing efficiency = real tokens / block tokens; supervised share = labels / real tokens
            out[split] = {**w.summary(0), **c,
                          "packing_efficiency": w.n_tokens / max(1, w.n_blocks * w.block_size),
                          "supervised_share": c["n_supervised"] / max(1, w.n_tokens)}
        return out


def describe(m: dict) -> list[str]:
    """inspect's lines for a version-2 folder: format, template, and each split's packing report."""
    lines = [f"data       {m['data_format']}, loss on {m['train_on']}, overlong samples {m['overlong']}d; "
             f"template {m.get('chat_template_origin')} sha256 {(m.get('chat_template_sha256') or '-')[:16]}; "
             f"end of turn {m['end_of_turn']['text']!r} (id {m['end_of_turn']['id']})"]
    for name, s in m["splits"].items():
        lines.append(f"{name:<10} {s['samples']:,} samples: {s['n_docs']:,} packed, {s['truncated']:,} truncated, "
                     f"{s['dropped_overlong']:,} dropped overlong, {s['dropped_unsupervised']:,} dropped with no "
                     f"supervised token; packing efficiency {s['packing_efficiency']:.1%} (real tokens / block "
                     f"tokens), supervised share {s['supervised_share']:.1%}")
    return lines
