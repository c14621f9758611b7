"""Tokenizer backends for prepare.

The reference is always the Hugging Face fast tokenizer. When it is GPT-2-style byte-level BPE,
the same ranks drive a tiktoken `Encoding` (3-4x faster, and it releases the GIL so threads scale);
it is used only after it gave the HF ids on a probe text, otherwise the HF tokenizer encodes.

The vendored `gpt2` skips transformers altogether (its import is ~0.7 s, half of a small prepare):
its files are checked by sha256 against the ones whose HF ids on the probe text are recorded below
(GPT2_REFERENCE), and tiktoken must give those ids; the HF tokenizer is then loaded only if
something asks for `Tokenizer.hf`. A record that no longer matches costs speed, not correctness:
the HF path above is taken. The unit tests compare the fast path with HF itself.

A tiktoken Encoding stands in for another tokenizer only after `_proven_ranks` showed that its rank table is that
tokenizer's merge table (every byte a token, one merge per other token, ids in merge order, GPT-2's pre-tokenizer,
nothing that tiktoken does not do) and it gave the same ids on the probe text; anything else encodes with HF.

Identity (`Tokenizer.sha256`, a manifest's `tokenizer.sha256`, compared by train and eval) is the tokenizer's content,
not its files: `vocabulary_sha256` of the id -> token table (added tokens included) and the merges, read from
tokenizer.json, or vocab.json + merges.txt (+ added_tokens.json). A folder written by save_pretrained and the vendored
vocab.json + merges.txt of the same vocabulary have one identity. The fingerprint of a prepare also covers the bytes
of the files (`files_sha256`), since a pre-tokenizer or normalizer setting changes the ids without changing the table.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from distclm.data.identity import TOKENIZER_FILES, hf_identity
from distclm.errors import UserError, first_line
from distclm.hub import is_local

VENDORED_GPT2 = Path(__file__).resolve().parent.parent / "assets" / "gpt2"
# The GPT-2 pre-tokenizer pattern (tiktoken's r50k pattern, the one in openai/gpt-2's encoder.py).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Text that exercises contractions, digits, unicode, whitespace runs and special characters.
PROBE_TEXT = (
    "Hello world! It's 2019; we'll test the tokenizer's merges:  tabs\tand\nnewlines\n\n"
    "Unicode: café, naïve, 東京, emoji 🎉, math ∑x² ≥ 10⁶, code `def f(x): return x**2`  "
    "numbers 3.14159 1,000,000 and CAPS LOCK. Don't they've I'm you're she'd      spaces.<|endoftext|>"
)


# What GPT2TokenizerFast gives for the vendored files (identified by `_files_sha256`): the ids of
# PROBE_TEXT, eos, len(tokenizer), and the max length set in `load_hf_tokenizer`.
GPT2_REFERENCE = {
    "sha256": "81dfed3cbb2dcbb9eae8a3c23efe9d5ce8c9fd9d8169d2c829e72d609ec182bc",
    "probe_ids": [
        15496, 995, 0, 632, 338, 13130, 26, 356, 1183, 1332, 262, 11241, 7509, 338, 4017, 3212, 25, 220, 22524,
        197, 392, 198, 3605, 6615, 198, 198, 3118, 291, 1098, 25, 40304, 11, 41492, 11, 10545, 251, 109, 12859,
        105, 11, 44805, 12520, 236, 231, 11, 10688, 18872, 239, 87, 31185, 26870, 838, 46256, 114, 11, 2438,
        4600, 4299, 277, 7, 87, 2599, 1441, 2124, 1174, 17, 63, 220, 3146, 513, 13, 1415, 19707, 352, 11, 830,
        11, 830, 290, 20176, 50, 406, 11290, 13, 2094, 470, 484, 1053, 314, 1101, 345, 821, 673, 1549, 220, 220,
        220, 220, 220, 9029, 13, 50256,
    ],
    "eos_token_id": 50256,
    "bos_token": "<|endoftext|>",  # transformers' GPT2TokenizerFast: BOS is the EOS token
    "vocab_size": 50257,
    "max_length": 1024,
    "identity": "47baff703a8a46b3d6e6353933b71b81463d62157090ffc671591b660c7317ea",  # folder_identity of the files
}


class Tokenizer:
    """What prepare needs of a tokenizer: batch encode, eos, vocab size, identity.

    `hf` is the transformers fast tokenizer (the reference, and the one saved with a model). When the
    vendored fast path did not need it, it is None at construction and loaded on first access;
    `known` then holds the recorded eos / vocab size / max length.
    """

    def __init__(self, name: str, hf, encode_batch: Callable[[list[str]], list[list[int]]], backend: str,
                 sha256: str, folder: Path | None,
                 encode_arrays: Callable[[list[str]], list[np.ndarray]] | None = None, known: dict | None = None,
                 files_sha256: str | None = None):
        self.name = name
        self._hf = hf
        self.encode_batch = encode_batch
        self.backend = backend  # "tiktoken" or "hf"
        self.sha256 = sha256  # the identity by content (vocabulary_sha256)
        self.files_sha256 = files_sha256 or sha256  # the bytes of its files (or the serialised tokenizer)
        self.folder = folder  # where the tokenizer files are, when they are local
        self._encode_arrays = encode_arrays
        self._known = known or {}

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, backend={self.backend!r}, sha256={self.sha256[:12]}...)"

    @property
    def hf(self):
        if self._hf is None:
            self._hf = load_hf_tokenizer(self.name)[0]
        return self._hf

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """One id array per text (uint32 from tiktoken, int64 otherwise): no Python int per token."""
        if self._encode_arrays is not None:
            return self._encode_arrays(texts)
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def special_text(self, token_id: int) -> str:
        """The text of a special token (e.g. EOS as a template writes it), without loading transformers when the
        fast path knows it."""
        specials = self._known.get("specials", {})
        return specials[token_id] if token_id in specials else self.hf.convert_ids_to_tokens(int(token_id))

    @property
    def bos_token(self) -> str:
        """BOS as text for templates that write it ('' when the tokenizer has none)."""
        bos = self._known["bos_token"] if "bos_token" in self._known else getattr(self.hf, "bos_token", None)
        return bos if isinstance(bos, str) else ""

    def chat_template(self) -> str | None:
        """The tokenizer's own chat template: from its folder's files when it has one, else transformers'."""
        if self.folder is not None and self._hf is None:
            config, jinja = self.folder / "tokenizer_config.json", self.folder / "chat_template.jinja"
            if jinja.is_file():
                return jinja.read_text(encoding="utf-8")
            if not config.is_file():
                return None
            t = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        else:
            t = getattr(self.hf, "chat_template", None)
        from distclm.data.chat import normalise_template

        return normalise_template(t)

    @property
    def eos_token_id(self) -> int:
        return self._known["eos_token_id"] if "eos_token_id" in self._known else self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self._known["vocab_size"] if "vocab_size" in self._known else len(self.hf)

    @property
    def max_length(self) -> int | None:
        if "max_length" in self._known:
            return self._known["max_length"]
        n = self.hf.model_max_length
        return n if n and n < 1e12 else None  # transformers' "no limit" sentinel is ~1e30


def _files_sha256(folder: Path) -> str:
    """sha256 over the tokenizer files (name + bytes), so identical files give identical ids."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
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
    local = is_local(spec)
    if local and not folder.is_dir():
        raise UserError(f"--data.tokenizer={spec}: no such folder")
    if not local:
        from distclm.hub import ensure_offline_if_unreachable

        ensure_offline_if_unreachable()
    try:
        return _from_pretrained(str(folder) if local else spec), (folder if local else None)
    except Exception as exc:  # noqa: BLE001 - hub and file errors come in many types; all mean "not loadable"
        first = first_line(exc, 200)
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


def _encoding(ranks: dict[bytes, int], specials: dict[str, int], name: str):
    """A tiktoken Encoding with GPT-2's pre-tokenizer pattern, or None when tiktoken cannot serve."""
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        return tiktoken.Encoding(name=f"distclm-{name}", pat_str=GPT2_PATTERN,
                                 mergeable_ranks=ranks, special_tokens=specials)
    except Exception:  # noqa: BLE001 - ranks tiktoken cannot use: fall back to HF
        return None


def _byte_ranks(vocab: dict[str, int], specials: dict[str, int]) -> dict[bytes, int] | None:
    """Byte-level BPE vocab (GPT-2's printable-character tokens) -> tiktoken's {token bytes: rank}.

    The ranks are the ids: GPT-2's ids are in merge order, which is what tiktoken's ranks mean.
    """
    # str.translate + latin-1 maps each character back to its byte in C (~2x faster than a genexpr per
    # token); a character outside the byte map becomes U+FFFF, which latin-1 refuses.
    table = {ord(ch): b for b, ch in bytes_to_unicode().items()}
    table.update({c: 0xFFFF for c in range(256) if c not in table})
    try:
        return {token.translate(table).encode("latin-1"): rank
                for token, rank in vocab.items() if token not in specials}
    except UnicodeEncodeError:
        return None


def _proven_ranks(state: dict) -> tuple[dict[bytes, int], dict[str, int]] | None:
    """(tiktoken ranks, special tokens) that drive the same merges as this tokenizer.json, or None when that is not
    shown. No names: a general check of what tiktoken would be given against what the tokenizer holds.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank (ranks = ids here); HF BPE merges the
    pair with the lowest merge index. The rank table is the merge table when: GPT-2's pre-tokenizer (ByteLevel with its
    regex, no prefix space) and no normalizer; no dropout, affixes or byte fallback; each of the 256 bytes is a token
    (else tiktoken panics on a byte it lacks); every other token is the result of exactly one merge; and ids grow with
    the merge index. Added tokens become tiktoken's specials, matched exactly, so none may have strip/word rules.
    """
    model, pre = state.get("model") or {}, state.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or state.get("normalizer") is not None:
        return None
    if (pre.get("type"), pre.get("add_prefix_space"), pre.get("use_regex", True)) != ("ByteLevel", False, True):
        return None
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback"):
        return None
    added = state.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None
    specials = {t["content"]: t["id"] for t in added}
    vocab = model.get("vocab") or {}
    if any(vocab.get(content, i) != i for content, i in specials.items()):
        return None
    ranks = _byte_ranks(vocab, specials)
    if ranks is None or len(set(ranks.values())) != len(ranks) or set(ranks.values()) & set(specials.values()):
        return None
    if sum(1 for token in ranks if len(token) == 1) != 256:
        return None
    merged, last = set(), -1
    for m in model.get("merges") or []:
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        token = left + right
        i = vocab.get(token)
        if i is None or left not in vocab or right not in vocab or i <= last or token in merged \
                or vocab[left] >= i or vocab[right] >= i:
            return None
        merged.add(token)
        last = i
    multi = sum(1 for token in ranks if len(token) > 1)
    return (ranks, specials) if multi == len(merged) else None


def _tiktoken_from_hf(hf, name: str):
    """A tiktoken Encoding with the HF tokenizer's ranks, or None unless `_proven_ranks` shows they are its merges."""
    proven = _proven_ranks(json.loads(hf.backend_tokenizer.to_str()))
    return None if proven is None else _encoding(*proven, name)


def _same_ids(enc, hf, text: str) -> bool:
    """Whether tiktoken gives the HF ids on `text`; a panic of tiktoken's Rust core (a BaseException) counts as no."""
    try:
        return enc.encode(text, allowed_special="all") == hf(text)["input_ids"]
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        return False


def gpt2_encoding(folder: Path = VENDORED_GPT2):
    """A tiktoken Encoding read straight from a GPT-2 `vocab.json` (no transformers), or None."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    specials = {"<|endoftext|>": vocab["<|endoftext|>"]}
    ranks = _byte_ranks(vocab, specials)
    return None if ranks is None else _encoding(ranks, specials, "gpt2")


def _tiktoken_tokenizer(spec: str, enc, hf, sha: str, folder: Path | None, num_threads: int,
                        known: dict | None = None, files_sha256: str | None = None) -> Tokenizer:
    # allowed_special="all": a special token written in the text becomes its id, as HF does.
    def encode_batch(texts: list[str]) -> list[list[int]]:
        return enc.encode_batch(texts, num_threads=num_threads, allowed_special="all")

    encode_arrays = None
    if hasattr(enc, "encode_to_numpy"):  # tiktoken >= 0.7: ids straight into an array, GIL released
        allowed = enc.special_tokens_set

        def encode_arrays(texts: list[str]) -> list[np.ndarray]:
            return [_encode_to_numpy(enc, text, allowed) for text in texts]

    known = {**(known or {}), "specials": {enc.encode_single_token(s): s for s in enc.special_tokens_set}}
    return Tokenizer(spec, hf, encode_batch, "tiktoken", sha, folder, encode_arrays, known, files_sha256)


def _encode_to_numpy(enc, text: str, allowed: frozenset) -> np.ndarray:
    """`enc.encode(text, allowed_special="all")` as a uint32 array, with `encode`'s surrogate fix-up."""
    try:
        return enc.encode_to_numpy(text, allowed_special=allowed, disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates (JSON can carry them): the repair tiktoken's `encode` applies
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, allowed_special=allowed, disallowed_special=())


def _vendored_gpt2(num_threads: int) -> Tokenizer | None:
    """The vendored GPT-2 on tiktoken without transformers, when the files and the probe ids match the record."""
    sha = _files_sha256(VENDORED_GPT2)
    if sha != GPT2_REFERENCE["sha256"]:
        return None
    enc = gpt2_encoding()
    if enc is None or enc.encode(PROBE_TEXT, allowed_special="all") != GPT2_REFERENCE["probe_ids"]:
        return None
    known = {k: GPT2_REFERENCE[k] for k in ("eos_token_id", "bos_token", "vocab_size", "max_length")}
    # The files are the recorded ones (sha above), so their identity is the recorded one too.
    return _tiktoken_tokenizer("gpt2", enc, None, GPT2_REFERENCE["identity"], VENDORED_GPT2, num_threads, known,
                               files_sha256=sha)


def load_tokenizer(spec: str, num_threads: int = 1, allow_fast_path: bool = True) -> Tokenizer:
    """Load the tokenizer and pick the fastest backend that gives the reference ids."""
    if spec == "gpt2" and allow_fast_path:
        tok = _vendored_gpt2(num_threads)
        if tok is not None:
            return tok
    hf, folder = load_hf_tokenizer(spec)
    if hf.eos_token_id is None:
        raise UserError(f"--data.tokenizer={spec}: the tokenizer has no EOS token, which packing needs")
    files = _files_sha256(folder) if folder is not None else hashlib.sha256(
        hf.backend_tokenizer.to_str().encode()).hexdigest()
    sha = hf_identity(hf)
    enc = _tiktoken_from_hf(hf, spec.replace("/", "-")) if allow_fast_path else None
    if enc is not None and _same_ids(enc, hf, PROBE_TEXT):
        return _tiktoken_tokenizer(spec, enc, hf, sha, folder, num_threads, files_sha256=files)

    def hf_encode_batch(texts: list[str]) -> list[list[int]]:
        try:
            encoded = hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        except TypeError:  # a lone surrogate (valid in a JSON string, not in UTF-8): fix up as tiktoken does
            encoded = hf.backend_tokenizer.encode_batch([_fix_surrogates(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encoded]

    return Tokenizer(spec, hf, hf_encode_batch, "hf", sha, folder, files_sha256=files)


def _fix_surrogates(text: str) -> str:
    """tiktoken's fix-up for text that is not valid Unicode: lone surrogates become U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")

