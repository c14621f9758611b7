"""Tokenizer backends for prepare.

The reference is always the Hugging Face fast tokenizer. When it is GPT-2-style byte-level BPE,
the same ranks drive a tiktoken `Encoding` (3-4x faster, and it releases the GIL so threads scale);
it is used only after it gave the HF ids on a probe text, otherwise the HF tokenizer encodes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from distclm.errors import UserError

VENDORED_GPT2 = Path(__file__).resolve().parent.parent / "assets" / "gpt2"
# The GPT-2 pre-tokenizer pattern (tiktoken's r50k pattern, the one in openai/gpt-2's encoder.py).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Text that exercises contractions, digits, unicode, whitespace runs and special characters.
PROBE_TEXT = (
    "Hello world! It's 2019; we'll test the tokenizer's merges:  tabs\tand\nnewlines\n\n"
    "Unicode: café, naïve, 東京, emoji 🎉, math ∑x² ≥ 10⁶, code `def f(x): return x**2`  "
    "numbers 3.14159 1,000,000 and CAPS LOCK. Don't they've I'm you're she'd      spaces.<|endoftext|>"
)


@dataclass
class Tokenizer:
    """What prepare needs of a tokenizer: batch encode, eos, vocab size, identity."""

    name: str
    hf: object  # transformers.PreTrainedTokenizerFast: the reference and the saved one
    encode_batch: Callable[[list[str]], list[list[int]]]
    backend: str  # "tiktoken" or "hf"
    sha256: str
    folder: Path | None  # where the tokenizer files are, when they are local

    @property
    def eos_token_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def max_length(self) -> int | None:
        n = self.hf.model_max_length
        return n if n and n < 1e12 else None  # transformers' "no limit" sentinel is ~1e30


def _files_sha256(folder: Path) -> str:
    """sha256 over the tokenizer files (name + bytes), so identical files give identical ids."""
    h = hashlib.sha256()
    names = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    for name in names:
        path = folder / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def load_hf_tokenizer(spec: str):
    """The transformers fast tokenizer for `gpt2` (vendored), a local folder or a hub id -> (tokenizer, folder).

    `PreTrainedTokenizerFast` rather than `AutoTokenizer`: the latter imports torch (~1.2 s, ~220 MB),
    which prepare must not pay. It reads tokenizer.json; a repo with only slow-tokenizer files goes
    through AutoTokenizer.
    """
    if spec == "gpt2":
        from transformers import GPT2TokenizerFast

        tok = GPT2TokenizerFast.from_pretrained(str(VENDORED_GPT2))
        tok.model_max_length = 1024  # GPT-2's n_positions; the vendored files carry no tokenizer_config
        return tok, VENDORED_GPT2
    folder = Path(spec).expanduser()
    local = spec.startswith((".", "/", "~")) or folder.exists()
    if local and not folder.is_dir():
        raise UserError(f"--data.tokenizer={spec}: no such folder")
    if not local:
        from distclm.hub import ensure_offline_if_unreachable

        ensure_offline_if_unreachable()
    try:
        return _from_pretrained(str(folder) if local else spec), (folder if local else None)
    except Exception as exc:  # noqa: BLE001 - hub and file errors come in many types; all mean "not loadable"
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        if local:
            raise UserError(f"--data.tokenizer={spec}: cannot load a tokenizer from this folder ({first})") from None
        from distclm.hub import hub_reachable, offline_hint

        why = offline_hint("tokenizer", "--data.tokenizer") if not hub_reachable() else first
        raise UserError(f"--data.tokenizer={spec}: cannot load it from the Hugging Face Hub: {why}; "
                        f"or use the vendored --data.tokenizer=gpt2") from None


def _from_pretrained(name: str):
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(name)
    except (ValueError, OSError):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, use_fast=True)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tiktoken_from_hf(hf, name: str):
    """A tiktoken Encoding with the HF tokenizer's ranks, or None when it is not GPT-2-style BPE."""
    import json

    try:
        import tiktoken
    except ImportError:
        return None
    state = json.loads(hf.backend_tokenizer.to_str())
    model, pre = state.get("model") or {}, state.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        return None
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    specials = {t.content: t_id for t_id, t in hf.added_tokens_decoder.items()}
    ranks = {}
    for token, rank in model["vocab"].items():
        if token in specials:
            continue
        try:
            ranks[bytes(byte_of[ch] for ch in token)] = rank
        except KeyError:
            return None
    try:
        return tiktoken.Encoding(name=f"distclm-{name}", pat_str=GPT2_PATTERN,
                                 mergeable_ranks=ranks, special_tokens=specials)
    except Exception:  # noqa: BLE001 - ranks tiktoken cannot use: fall back to HF
        return None


def load_tokenizer(spec: str, num_threads: int = 1, allow_fast_path: bool = True) -> Tokenizer:
    """Load the tokenizer and pick the fastest backend that gives the reference ids."""
    hf, folder = load_hf_tokenizer(spec)
    if hf.eos_token_id is None:
        raise UserError(f"--data.tokenizer={spec}: the tokenizer has no EOS token, which packing needs")
    sha = _files_sha256(folder) if folder is not None else hashlib.sha256(
        hf.backend_tokenizer.to_str().encode()).hexdigest()
    enc = _tiktoken_from_hf(hf, spec.replace("/", "-")) if allow_fast_path else None
    if enc is not None and enc.encode(PROBE_TEXT, allowed_special="all") == hf(PROBE_TEXT)["input_ids"]:
        # allowed_special="all": a special token written in the text becomes its id, as HF does.
        def encode_batch(texts: list[str]) -> list[list[int]]:
            return enc.encode_batch(texts, num_threads=num_threads, allowed_special="all")

        return Tokenizer(spec, hf, encode_batch, "tiktoken", sha, folder)

    def hf_encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]

    return Tokenizer(spec, hf, hf_encode_batch, "hf", sha, folder)


def default_threads() -> int:
    return os.cpu_count() or 1
