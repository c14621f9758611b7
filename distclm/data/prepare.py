"""`distclm prepare`: documents -> tokens -> fixed blocks -> shards + manifest, in one streaming pass.

    read + extract (main thread) -> tokenize (thread pool, results taken in submission order)
      -> EOS after each document -> per-split Packer -> SplitWriter shards -> manifest.json last

Chat / prompt_completion records (--data.format, detected from the first record) take the same pool and
resume state with other parts (prepare_chat.py): records -> pieces rendered by the chat template ->
tokens + loss flags (samples.py) -> whole samples packed first-fit -> shards + mask shards + a version-2 manifest.

Memory is bounded by the chunks in flight (2 per worker, ~1 MB of text each) whatever the corpus
size. Output depends only on the documents and the settings that the fingerprint covers: not on
worker count, chunk size or timing. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from distclm import __version__
from distclm.atomic import atomic_write, check_writable, disk_full_is_one_line
from distclm.config import Config, num_workers, to_yaml
from distclm.data import sources
from distclm.data.blocks import FORMAT, MANIFEST, VERSION, SplitWriter, dump_json, read_manifest
from distclm.data.identity import IDENTITY, changed_inputs, check_unchanged, input_identity, save_tokenizer
from distclm.data.pack import Packer, concat_docs, token_dtype
from distclm.data.prepare_chat import ChatData, SampleSplits, resolve_format
from distclm.data.samples import encode_samples
from distclm.data.tokenize import Tokenizer, load_tokenizer
from distclm.errors import UserError
from distclm.ownership import check_claimable, claim_dir

STATE = ".prepare-state.json"
TOKENIZER_DIR = "tokenizer"  # the tokenizer the blocks were made with, saved in the folder (manifest tokenizer.dir)
CHUNK_CHARS = 1 << 20  # ~1 MB of text per tokenize task: large enough to amortise, small for memory
CHUNK_DOCS = 4096
CHAT_CHUNK = 128  # records per chunk of chat / prompt_completion records
RESUMES = "no manifest written, so not read as complete; free some space and prepare again: it resumes from its last shard"


def split_of(position: int, seed: int, val_fraction: float) -> str:
    """Seeded per-document split: depends on the document's position only, not on batching or workers."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "little") / 2**64 < val_fraction else "train"


def source_specs(cfg: Config) -> list[tuple[str | None, sources.SourceSpec]]:
    """(fixed split or None for a carved one, spec) for each stream to read, in order."""
    d = cfg.data
    if not d.source:
        raise UserError("--data.source is required: a hub dataset id, a local file/folder/glob, or `pydoc`")
    base = sources.SourceSpec(d.source, d.config, d.split, d.revision, d.max_docs, d.text_field,
                              d.join_with, d.txt_mode)
    if d.val_split is None:
        return [(None, base)]
    if sources.is_local_source(d.source):
        val = sources.SourceSpec(d.val_split, None, d.split, None, None, d.text_field, d.join_with, d.txt_mode)
    else:
        val = sources.SourceSpec(d.source, d.config, d.val_split, d.revision, None, d.text_field,
                                 d.join_with, d.txt_mode)
    return [("train", base), ("validation", val)]


def settings(cfg: Config, tok: Tokenizer, chat_data: ChatData | None = None) -> dict:
    """Everything that decides the output bytes; its hash is the fingerprint (a chat template by its sha256)."""
    d = cfg.data
    specs = source_specs(cfg)
    extra = {"chat": chat_data.settings(d)} if chat_data is not None else {}
    return {**extra,
        "source": {"source": d.source, "config": d.config, "split": d.split, "revision": d.revision,
                   "text_field": d.text_field, "join_with": d.join_with, "max_docs": d.max_docs,
                   "txt_mode": d.txt_mode, "eos_between_docs": d.eos_between_docs, "val_fraction": d.val_fraction,
                   "val_docs": d.val_docs, "val_split": d.val_split, "seed": d.seed,
                   "files": [input_identity(spec) for _, spec in specs]},
        "block_size": d.block_size, "shard_blocks": d.shard_blocks,
        "tokenizer": {"name": d.tokenizer, "sha256": tok.sha256, "files_sha256": tok.files_sha256},
    }


def fingerprint(s: dict) -> str:
    return hashlib.sha256(dump_json(s)).hexdigest()


class Chunk:
    """A run of consecutive documents: their split labels and text."""

    __slots__ = ("end", "labels", "texts")

    def __init__(self, end: int, labels: list[str], texts: list[str]):
        self.end, self.labels, self.texts = end, labels, texts


def _labelled_docs(cfg: Config, start: int, raw: bool = False) -> Iterator[tuple[str, str]]:
    """(split, text) for each document from position `start` on, with the split decided per document
    (`raw`: the whole record instead of its text, for chat / prompt_completion)."""
    d = cfg.data
    streams = []
    val_set = None
    for fixed, spec in source_specs(cfg):
        if fixed is None and d.val_docs is not None:
            # An exact count needs the number of documents: one cheap pass that only counts records.
            n = sum(1 for _ in islice(sources.records(spec), spec.max_docs))
            if d.val_docs >= n:
                raise UserError(f"--data.val_docs={d.val_docs} leaves no training document ({n} documents)")
            rng = np.random.default_rng(d.seed)
            val_set = set(rng.choice(n, size=d.val_docs, replace=False).tolist())
        streams.append((fixed, islice(sources.records(spec), spec.max_docs) if raw else sources.documents(spec)))
    position = 0
    for fixed, docs in streams:
        for text in docs:
            if position >= start:
                if fixed is not None:
                    label = fixed
                elif val_set is not None:
                    label = "validation" if position in val_set else "train"
                else:
                    label = split_of(position, d.seed, d.val_fraction)
                yield label, text
            position += 1


def _chunks(docs: Iterator[tuple[str, str]], start: int, size=len) -> Iterator[Chunk]:
    labels, texts, chars, position = [], [], 0, start
    for label, text in docs:
        labels.append(label)
        texts.append(text)
        chars += size(text)
        position += 1
        if chars >= CHUNK_CHARS or len(texts) >= CHUNK_DOCS:
            yield Chunk(position, labels, texts)
            labels, texts, chars = [], [], 0
    if texts:
        yield Chunk(position, labels, texts)


def _encode(tok: Tokenizer, chunk: Chunk, eos: int | None, dtype: np.dtype) -> dict[str, tuple[np.ndarray, int]]:
    """Tokenize one chunk -> {split: (flat tokens with EOS, non-empty docs)}. Runs in a worker thread."""
    ids = tok.encode_arrays(chunk.texts)  # arrays, not lists: no Python int per token (that would hold the GIL)
    out = {}
    for split in ("train", "validation"):
        docs = [d for d, label in zip(ids, chunk.labels) if label == split and len(d)]  # empty documents add nothing
        if docs:
            out[split] = (concat_docs(docs, eos, dtype), len(docs))
    return out


class Prepared:
    """What a prepare run produced (for the CLI's summary line).

    `seconds`: the whole call (tokenizer load included); `stream_seconds`: from the first document
    read to the manifest written (None when an existing output was reused).
    """

    def __init__(self, manifest: dict, seconds: float, reused: bool, backend: str,
                 stream_seconds: float | None = None):
        self.manifest, self.seconds, self.reused, self.backend = manifest, seconds, reused, backend
        self.stream_seconds = stream_seconds


class Splits:
    """The train and validation outputs: a Packer (remainder carried across chunks) and a SplitWriter each."""

    def __init__(self, out: Path, d, dtype: np.dtype, state: dict | None):
        self.out, self.writers, self.packers = out, {}, {}
        for split in ("train", "validation"):
            saved = (state or {}).get("splits", {}).get(split, {})
            self.writers[split] = SplitWriter(out, split, d.block_size, dtype, d.shard_blocks,
                                              shards=saved.get("shards", []), open_blocks=saved.get("open_blocks", 0),
                                              n_docs=saved.get("n_docs", 0), n_tokens=saved.get("n_tokens", 0))
            self.packers[split] = Packer(d.block_size, dtype, np.array(saved.get("carry", []), dtype))
        self.docs = self.bytes = 0  # this run's progress

    def feed(self, encoded: dict) -> bool:
        """One chunk's {split: (tokens, n_docs)} -> blocks written; True when a shard was completed."""
        completed = False
        for split, (tokens, n_docs) in encoded.items():
            w = self.writers[split]
            w.n_docs += n_docs
            w.n_tokens += len(tokens)
            blocks = self.packers[split].feed(tokens)
            completed |= w.write(blocks)
            self.bytes += blocks.nbytes
            self.docs += n_docs
        return completed

    @property
    def tokens(self) -> int:
        return sum(w.n_tokens for w in self.writers.values())

    def state(self) -> dict:
        return {k: {**w.state(), "carry": self.packers[k].carry.tolist()} for k, w in self.writers.items()}

    def finish(self) -> dict:
        for w in self.writers.values():
            w.finish()
        return {k: w.summary(self.packers[k].dropped) for k, w in self.writers.items()}


def save_state(out: Path, splits, fp: str, next_doc: int, files: list | None = None) -> None:
    """After a completed shard: what a resume needs (its blocks made durable first), and the input identity it was
    made from (to say which file changed when a resume is refused)."""
    for w in splits.writers.values():
        w.sync()
    atomic_write(out / STATE, dump_json({"fingerprint": fp, "next_doc": next_doc, "splits": splits.state(),
                                         "files": files}))


def prepare(cfg: Config, progress=None) -> Prepared:
    """Run prepare into `cfg.data.dir`; returns at once when a complete output with the same fingerprint is there."""
    d = cfg.data
    if not d.dir:
        raise UserError("--data.dir is required: the folder to write the blocks to")
    t0 = time.perf_counter()
    out = Path(d.dir)
    for _, spec in source_specs(cfg):  # fail on a missing file before loading the tokenizer
        if sources.is_local_source(spec.source):
            sources.local_files(spec.source)
    if cfg.run.overwrite or not (out / MANIFEST).exists():  # a complete folder is reused as it is (read-only too)
        check_writable(out, "--data.dir")
    tok = load_tokenizer(d.tokenizer, num_threads=1)
    if tok.max_length is not None and d.block_size > tok.max_length:
        raise UserError(f"--data.block_size={d.block_size} exceeds the tokenizer's maximum length {tok.max_length}")
    fmt = resolve_format(d, source_specs(cfg))
    chat_data = ChatData(d, fmt, tok, source_specs(cfg)) if fmt != "text" else None
    s = settings(cfg, tok, chat_data)
    fp = fingerprint(s)
    state = _check_out_dir(out, fp, cfg.run.overwrite, s["source"]["files"])
    if state == "complete":
        return Prepared(read_manifest(out), time.perf_counter() - t0, True, tok.backend)
    claim_dir(out, "data", "--data.dir")
    (out / "prepare.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    dtype = token_dtype(tok.vocab_size)
    start = state["next_doc"] if state else 0
    if state and progress:
        progress.note(f"resuming an interrupted prepare from document {start}")
    t_stream = time.perf_counter()
    splits, chunks, encode = _parts(cfg, tok, dtype, chat_data, state, start)
    _stream(cfg, encode, chunks, splits, fp, progress, s["source"]["files"])
    check_unchanged(cfg.data.source, [spec for _, spec in source_specs(cfg)], s["source"]["files"])
    save_tokenizer(tok, out / TOKENIZER_DIR)  # before the manifest, which publishes the folder
    manifest = {**_manifest(cfg, tok, dtype, s, fp, splits.finish()),
                **(chat_data.manifest(d) if chat_data is not None else {})}
    atomic_write(out / MANIFEST, dump_json(manifest))
    (out / STATE).unlink(missing_ok=True)
    t_end = time.perf_counter()
    return Prepared(manifest, t_end - t0, False, tok.backend, t_end - t_stream)


def _parts(cfg: Config, tok: Tokenizer, dtype: np.dtype, chat_data: ChatData | None, state, start: int):
    """(the split outputs, the chunks of documents from `start` on, how a worker encodes a chunk) for the format."""
    d, out = cfg.data, Path(cfg.data.dir)
    if chat_data is None:
        eos = tok.eos_token_id if d.eos_between_docs else None
        return (Splits(out, d, dtype, state), _chunks(_labelled_docs(cfg, start), start),
                lambda chunk: _encode(tok, chunk, eos, dtype))
    # A chunk of records: ~128 of them (a record's size is not known without serialising it again). Smaller than
    # text chunks: rendering holds the GIL, so the tokenizing of one chunk overlaps the rendering of the next.
    chunks = _chunks(_labelled_docs(cfg, start, raw=True), start, size=lambda rec: CHUNK_CHARS // CHAT_CHUNK)
    return (SampleSplits(out, d, dtype, tok.eos_token_id, state), chunks,
            lambda chunk: encode_samples(tok, chat_data.renderer, chunk.texts, chunk.labels,
                                         chunk.end - len(chunk.texts), d.block_size, d.overlong))


def _stream(cfg: Config, encode, chunks, splits, fp: str, progress, files: list | None = None) -> None:
    """Chunks of documents -> `encode`d in the pool (at most 2 chunks per worker in flight), packed and
    written in submission order; the resume state is saved after each completed shard."""
    d = cfg.data
    workers = num_workers(d)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()

        def drain(limit: int) -> None:
            while len(pending) > limit:
                chunk, future = pending.popleft()
                if splits.feed(future.result()):
                    save_state(Path(d.dir), splits, fp, chunk.end, files)
                if progress:
                    progress.update(docs=splits.docs, tokens=splits.tokens, bytes=splits.bytes)

        try:
            for chunk in chunks:
                pending.append((chunk, pool.submit(encode, chunk)))
                drain(2 * workers)
            drain(0)
        except ValueError as exc:  # an id that does not fit the dtype
            raise UserError(f"--data.tokenizer={d.tokenizer}: {exc}") from None
        finally:
            for _, future in pending:
                future.cancel()


def _manifest(cfg: Config, tok: Tokenizer, dtype: np.dtype, s: dict, fp: str, splits: dict) -> dict:
    d = cfg.data
    if splits["train"]["n_blocks"] == 0:
        _cleanup(Path(d.dir))
        total = sum(v["n_tokens"] for v in splits.values())
        t = splits["train"]
        why = (f"{t['samples']} samples read, {t['dropped_overlong']} dropped as overlong, {t['dropped_unsupervised']} "
               f"with no token that gets loss; check --data.format, --data.train_on, --data.overlong") \
            if "samples" in t else "check --data.text_field"
        raise UserError(f"--data.source={d.source}: the corpus gave no training block ({total} tokens in "
                        f"{sum(v['n_docs'] for v in splits.values())} non-empty documents, block_size {d.block_size}; "
                        f"{why}, --data.max_docs and --data.block_size")
    return {
        "format": FORMAT, "version": VERSION, "dtype": dtype.name, "block_size": d.block_size,
        "vocab_size": tok.vocab_size, "eos_token_id": tok.eos_token_id,
        # sha256: the identity by content (tokenize.vocabulary_sha256, named by `identity`); dir: the saved copy
        "tokenizer": {"name": d.tokenizer, "sha256": tok.sha256, "identity": IDENTITY, "dir": TOKENIZER_DIR},
        "source": {**s["source"], "fingerprint": fp},  # files: [name, bytes, sha256] of each input, per stream
        "shard_blocks": d.shard_blocks, "splits": splits, "distclm_version": __version__,
    }


def _check_out_dir(out: Path, fp: str, overwrite: bool, files: list | None = None):
    """'complete' (same fingerprint, done), a resume state, or None (fresh). Refuses another fingerprint: other
    settings or other input bytes (`files`, the input identity) are never resumed or reused, never mixed."""
    manifest_path, state_path = out / MANIFEST, out / STATE
    if not check_claimable(out, "data", "--data.dir"):  # new or empty; a folder not distclm's data is refused
        return None
    other = None
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
            old_fp = old.get("source", {}).get("fingerprint")
            old_files = old.get("source", {}).get("files")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            old_fp = old_files = None
        if old_fp == fp and not overwrite:
            return "complete"
        other = "a complete prepare of other settings" + changed_inputs(old_files, files or [])
    elif state_path.exists():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            state = {}
        if state.get("fingerprint") == fp and not overwrite:
            return state
        other = "an interrupted prepare of other settings" + changed_inputs(state.get("files"), files or [])
    if other and not overwrite:
        raise UserError(f"--data.dir={out} holds {other}; choose another --data.dir or pass --overwrite to replace it")
    _cleanup(out)
    return None


# What prepare writes into a data folder: shards and mask shards ({split}-{index:05d}[.mask].bin), their .partial
# names while open, the manifest, the resume state, the settings file, and atomic_write's .tmp names of them.
OWN_FILE = re.compile(r"(train|validation)-\d{5}(\.mask)?\.bin(\.partial)?|"
                      + "|".join(re.escape(n) + r"(\.tmp)?" for n in (MANIFEST, STATE, "prepare.yaml")))


def _cleanup(out: Path) -> None:
    """Remove prepare's own files from a data folder of distclm's (files of those names only, and the tokenizer/
    folder prepare saves: nothing else)."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if OWN_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()
        elif p.name == TOKENIZER_DIR and p.is_dir() and not p.is_symlink():  # save_tokenizer's copy, in our folder
            shutil.rmtree(p)


def prepare_command(inv) -> int:
    """`distclm prepare`: progress while it runs, then one summary line (docs -> tokens -> blocks, rate)."""
    from distclm.console import PrepareProgress

    cfg = inv.cfg
    progress = PrepareProgress(interval_s=min(cfg.log.interval_s, 5.0), total_docs=cfg.data.max_docs)
    try:
        with disk_full_is_one_line(f"--data.dir={cfg.data.dir}", cfg.data.dir or ".", RESUMES):
            result = prepare(cfg, progress)
    finally:
        progress.close()
    m = result.manifest
    sp = m["splits"]
    tokens = sum(s["n_tokens"] for s in sp.values())
    if result.reused:
        print(f"prepare: {cfg.data.dir} is complete with these settings; nothing to do (--overwrite to redo it)")
    rate = "" if result.reused else \
        f" in {result.seconds:.1f}s ({tokens / max(result.seconds, 1e-9) / 1e6:.2f}M tok/s, {result.backend})"
    print(f"prepared {sum(s['n_docs'] for s in sp.values()):,} docs -> {tokens:,} tokens -> "
          + ", ".join(f"{k} {s['n_blocks']:,} blocks" for k, s in sp.items())
          + f" of {m['block_size']} ({m['dtype']}){rate} -> {cfg.data.dir}")
    if m.get("data_format"):
        from distclm.data.prepare_chat import describe as describe_samples

        how = "detected" if cfg.data.format == "auto" else "--data.format"
        print(f"format {m['data_format']} ({how}); " + "\n".join(describe_samples(m)[1:]))
    return 0
