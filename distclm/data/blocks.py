"""The block-file format: shard files of raw token ids + a versioned manifest.json.

A shard `{split}-{index:05d}.bin` is little-endian ids of shape (n_blocks, block_size), no header:
`np.memmap(path, dtype, mode="r").reshape(-1, block_size)` reads it.

Version 2 (chat / prompt_completion folders) adds beside each shard `{split}-{index:05d}.mask.bin`: one uint8
of flags per token, same (n_blocks, block_size) shape, listed in the shard's entry (`mask_file`, `mask_sha256`):

    bit 0 (LOSS)   the token is a label: the loss of predicting it from the tokens before it counts
    bit 1 (START)  a sample (or the padding after the last one) starts here: attention and positions restart

Version-1 folders have no mask: every token is a label and documents are separated by EOS. Shards are written under a
`.partial` name, fsynced and renamed; the manifest is written last (the same way), so a folder
without a manifest is never taken as complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distclm.atomic import publish_file
from distclm.data.schema import FileName, Hex, Int, Invalid, ListOf, MapOf, Number, OneOf, Opt, Record, Str, check
from distclm.errors import UserError

FORMAT = "distclm-blocks"
VERSION = 1  # text folders: every token a label
VERSION_MASKED = 2  # chat / prompt_completion folders: a flags file beside each shard
MANIFEST = "manifest.json"
LOSS, START = 1, 2  # the bits of a mask file's byte
DTYPE_IDS = {"uint16": 1 << 16, "uint32": 1 << 32}  # how many distinct ids each shard dtype holds

# The manifest's schema, per version: what prepare writes (prepare.py's _manifest, SplitWriter.summary, prepare_chat's
# ChatData.manifest and SampleSplits.finish) and read_manifest checks before any field is trusted. Keys not listed
# are allowed (added within a version); the rules across fields follow.
SHA256, COUNT = Hex(64), Int(0)
SHARD = Record({"file": FileName(), "n_blocks": COUNT, "sha256": SHA256})
SPLIT = Record({"shards": ListOf(SHARD), "n_blocks": COUNT, "n_tokens": COUNT, "n_docs": COUNT,
                "dropped_tokens": COUNT})
SCHEMA_V1 = Record({
    "format": OneOf(FORMAT), "version": OneOf(VERSION, VERSION_MASKED), "dtype": OneOf(*DTYPE_IDS),
    "block_size": Int(2),  # a block predicts block_size - 1 tokens: 1 would train on nothing
    "vocab_size": Int(1), "eos_token_id": COUNT,
    "tokenizer": Record({"name": Str(".+", "a non-empty string"), "sha256": SHA256}),
    "source": Record({}, {"fingerprint": Str()}),
    "splits": MapOf(SPLIT, "an object of splits ({name: {shards, n_blocks, ...}})"),
}, {"shard_blocks": Int(1), "distclm_version": Str()})
MASKED_SHARD = SHARD.extend({"mask_file": FileName(), "mask_sha256": SHA256})
MASKED_SPLIT = SPLIT.extend({"shards": ListOf(MASKED_SHARD), **dict.fromkeys(
    ("samples", "truncated", "dropped_overlong", "dropped_unsupervised", "n_supervised", "eot_supervised"), COUNT),
    "packing_efficiency": Number(0, 1), "supervised_share": Number(0, 1)})
SCHEMA_V2 = SCHEMA_V1.extend({
    "splits": MapOf(MASKED_SPLIT, "an object of splits ({name: {shards, n_blocks, ...}})"),
    "data_format": OneOf("chat", "prompt_completion"), "train_on": OneOf("assistant", "all"),
    "overlong": OneOf("truncate", "drop"), "chat_template": Opt(Str()), "chat_template_sha256": Opt(SHA256),
    "chat_template_origin": Opt(Str()), "end_of_turn": Record({"text": Str(), "id": Opt(COUNT)}),
})
SCHEMAS = {VERSION: SCHEMA_V1, VERSION_MASKED: SCHEMA_V2}


def _across_fields(m: dict):
    """The rules between fields, checked after the types: (field, what it must be, what it is) of each broken one."""
    ids = DTYPE_IDS[m["dtype"]]
    if m["vocab_size"] > ids:  # every id < vocab_size must fit the shard dtype
        yield "vocab_size", f"at most {ids} with dtype {m['dtype']}", m["vocab_size"]
    if m["eos_token_id"] >= m["vocab_size"]:
        yield "eos_token_id", f"below vocab_size ({m['vocab_size']})", m["eos_token_id"]
    seen = set()
    for name, s in m["splits"].items():
        total = sum(shard["n_blocks"] for shard in s["shards"])
        if s["n_blocks"] != total:
            yield f"splits.{name}.n_blocks", f"the sum of its shards' n_blocks ({total})", s["n_blocks"]
        for i, shard in enumerate(s["shards"]):
            for key in ("file", "mask_file"):
                if key in shard and shard[key] in seen:  # a file counted twice would be read twice
                    yield f"splits.{name}.shards[{i}].{key}", "a file no other shard lists", shard[key]
                seen.add(shard.get(key))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def mask_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.mask.bin"


def dump_json(obj) -> bytes:
    """Canonical JSON: sorted keys, fixed separators, so equal content gives equal bytes."""
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def file_sha256(path: Path) -> str:
    return scan(path)[0]


def scan(path: Path, dtype: np.dtype | None = None) -> tuple[str, int | None]:
    """(sha256, largest item) of a file in one read; the items are little-endian `dtype` (None: no maximum).
    4 MiB chunks are whole items of any dtype here; the caller has checked the size is too."""
    h, top = hashlib.sha256(), None
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
            if dtype is not None:
                m = int(np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).max())
                top = m if top is None else max(top, m)
    return h.hexdigest(), top


@dataclass
class SplitWriter:
    """Appends blocks of one split to shard files; a shard is renamed into place when full.

    Its state (complete shards, blocks in the open shard, counters) is plain data, saved by the
    caller after a shard completes, so an interrupted prepare resumes from the last complete shard.
    With `masks`, each block's flags (uint8, same shape) go to the shard's mask file alongside.
    """

    out: Path
    split: str
    block_size: int
    dtype: np.dtype
    shard_blocks: int
    shards: list[dict] = field(default_factory=list)
    open_blocks: int = 0  # blocks already in the open .partial shard
    n_docs: int = 0
    n_tokens: int = 0  # tokens of this split's documents (EOS included), dropped tail included
    masks: bool = False

    def __post_init__(self):
        self._fhs = None

    @property
    def n_blocks(self) -> int:
        return sum(s["n_blocks"] for s in self.shards) + self.open_blocks

    def _names(self) -> list[tuple[str, int]]:
        """(final file name, bytes per token) of the open shard's files: tokens, then flags when masked."""
        index = len(self.shards)
        names = [(shard_name(self.split, index), self.dtype.itemsize)]
        return names + [(mask_name(self.split, index), 1)] if self.masks else names

    def _open(self) -> list:
        if self._fhs is None:
            self._fhs = [self._open_one(self.out / name, itemsize) for name, itemsize in self._names()]
        return self._fhs

    def _open_one(self, final: Path, itemsize: int):
        path = final.with_name(final.name + ".partial")
        keep = self.open_blocks * self.block_size * itemsize
        if keep and not path.exists():
            # Killed after this shard was renamed into place but before the state that counts it
            # was saved: its first `open_blocks` blocks are the saved ones, so take it back.
            if not final.is_file() or final.stat().st_size < keep:
                raise UserError(f"{path}: missing, but the prepare state counts {self.open_blocks} blocks "
                                f"in it; rerun prepare with --overwrite")
            os.replace(final, path)
        fh = open(path, "r+b" if path.exists() else "wb")
        # Resume: cut anything past the last saved state (a killed run may have written more).
        fh.truncate(keep)
        fh.seek(0, os.SEEK_END)
        return fh

    def write(self, blocks: np.ndarray, flags: np.ndarray | None = None) -> bool:
        """Append (n, block_size) blocks (and their flags when masked); returns True when a shard was completed."""
        completed = False
        while len(blocks):
            room = self.shard_blocks - self.open_blocks
            part, blocks = blocks[:room], blocks[room:]
            files = self._open()
            files[0].write(part.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            if self.masks:
                files[1].write(flags[:room].astype(np.uint8, copy=False).tobytes())
                flags = flags[room:]
            self.open_blocks += len(part)
            if self.open_blocks == self.shard_blocks:
                self._close_shard()
                completed = True
        return completed

    def _close_shard(self) -> None:
        entry = {"n_blocks": self.open_blocks}
        for fh, (name, _), key in zip(self._open(), self._names(), ("", "mask_")):
            fh.close()
            publish_file(self.out / (name + ".partial"), self.out / name)
            entry.update({f"{key}file": name, f"{key}sha256": file_sha256(self.out / name)})
        self._fhs = None
        self.shards.append(entry)
        self.open_blocks = 0

    def sync(self) -> None:
        """Make the open shard's blocks durable before a state that counts them is saved."""
        for fh in self._fhs or []:
            fh.flush()
            os.fsync(fh.fileno())

    def finish(self) -> None:
        if self.open_blocks:
            self._close_shard()
        elif self._fhs is not None:
            for fh, (name, _) in zip(self._fhs, self._names()):
                fh.close()
                (self.out / (name + ".partial")).unlink(missing_ok=True)
            self._fhs = None

    def state(self) -> dict:
        return {"shards": self.shards, "open_blocks": self.open_blocks,
                "n_docs": self.n_docs, "n_tokens": self.n_tokens}

    def summary(self, dropped: int) -> dict:
        return {"shards": self.shards, "n_blocks": self.n_blocks, "n_tokens": self.n_tokens,
                "n_docs": self.n_docs, "dropped_tokens": dropped}


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a prepared folder, checked for format and version, then against its version's schema: a
    field of the wrong type or range, a key missing or a shard named outside the folder is one line naming
    manifest.json and the field."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"--data.dir={folder}: no such folder; run `distclm prepare --data.dir={folder}` first")
    if not path.is_file():
        partial = any(folder.glob("*.partial")) or (folder / ".prepare-state.json").exists()
        why = "an interrupted prepare (rerun the same prepare command to resume it)" if partial else \
            "not a prepared folder"
        raise UserError(f"{path}: missing, so {folder} is {why}; run `distclm prepare --data.dir={folder}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); re-run prepare with --overwrite") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: field 'format' is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                        f"expected {FORMAT!r}: not a distclm block folder")
    if manifest.get("version") not in (VERSION, VERSION_MASKED):
        raise UserError(f"{path}: field 'version' is {manifest.get('version')!r}, but this distclm reads "
                        f"versions {VERSION} and {VERSION_MASKED}; re-run prepare with this version (--overwrite) or upgrade distclm")
    try:
        check(SCHEMAS[manifest["version"]], manifest)
        broken = next(_across_fields(manifest), None)
        if broken is not None:
            raise Invalid(*broken)
    except Invalid as exc:
        raise UserError(f"{path}: {exc}; re-run prepare with --overwrite") from None
    return manifest


class SplitBlocks:
    """One split's blocks across its shards; block i in O(1) (a search over shard offsets + one read).

    Blocks are read with `os.pread` rather than through a long-lived memmap: the same O(1) access,
    but resident memory stays flat over a full pass (a memmap keeps every touched page mapped).
    """

    def __init__(self, folder: Path, name: str, info: dict, block_size: int, dtype: np.dtype, masked: bool = False):
        self.name = name
        self.block_size = block_size
        self.dtype = dtype
        self.n_tokens = info.get("n_tokens")
        self.n_docs = info.get("n_docs")
        self._block_bytes = block_size * dtype.itemsize
        self.paths = [folder / s["file"] for s in info["shards"]]
        self.shards = info["shards"]
        counts = [int(s["n_blocks"]) for s in info["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._fds: list[int] = []
        self.masked = masked  # a version-2 folder: every shard has its flags file (the schema says so)
        self.mask_paths = [folder / s["mask_file"] for s in info["shards"]] if self.masked else []
        self._mask_fds: list[int] = []

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _fd(self, shard: int) -> int:
        if not self._fds:
            self._fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        return self._fds[shard]

    def __getitem__(self, index: int) -> np.ndarray:
        """Block `index`, shape (block_size,)."""
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for split {self.name!r} with {len(self)} blocks")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        offset = (index - int(self._starts[shard])) * self._block_bytes
        data = os.pread(self._fd(shard), self._block_bytes, offset)
        return np.frombuffer(data, dtype=self.dtype.newbyteorder("<")).astype(self.dtype)

    def batch(self, indices) -> np.ndarray:
        """Blocks at `indices`, shape (len(indices), block_size)."""
        out = np.empty((len(indices), self.block_size), dtype=self.dtype)
        for row, index in enumerate(indices):
            out[row] = self[int(index)]
        return out

    def _mask_fd(self, shard: int) -> int:
        if not self._mask_fds:
            self._mask_fds = [os.open(p, os.O_RDONLY) for p in self.mask_paths]
        return self._mask_fds[shard]

    def flags(self, indices) -> np.ndarray | None:
        """The LOSS/START flags of the blocks at `indices`, (len(indices), block_size) uint8; None for a
        version-1 split (every token a label, documents separated by EOS)."""
        if not self.masked:
            return None
        out = np.empty((len(indices), self.block_size), dtype=np.uint8)
        for row, index in enumerate(indices):
            index = int(index)
            if not 0 <= index < len(self):
                raise IndexError(f"block {index} out of range for split {self.name!r} with {len(self)} blocks")
            shard = int(np.searchsorted(self._starts, index, side="right")) - 1
            offset = (index - int(self._starts[shard])) * self.block_size
            out[row] = np.frombuffer(os.pread(self._mask_fd(shard), self.block_size, offset), dtype=np.uint8)
        return out

    def first(self, n: int | None) -> "SplitBlocks":
        """The first `n` blocks of this split (all of them when n is None or larger), same files, no copy."""
        if n is None or n >= len(self):
            return self
        view = SplitBlocks.__new__(SplitBlocks)
        view.__dict__.update(self.__dict__)
        view._starts = np.minimum(self._starts, n)
        view._fd, view._mask_fd = self._fd, self._mask_fd  # reads through this split's files: closed with it
        view.close = lambda: None
        return view

    def memmap(self, shard: int) -> np.ndarray:
        """One shard as a read-only memmap, shape (n_blocks, block_size)."""
        return np.memmap(self.paths[shard], dtype=self.dtype.newbyteorder("<"), mode="r").reshape(-1, self.block_size)

    def close(self) -> None:
        for fd in self._fds + self._mask_fds:
            os.close(fd)
        self._fds, self._mask_fds = [], []


class BlockReader:
    """A prepared folder, opened read-only and checked against its manifest."""

    def __init__(self, folder: str | Path, verify: bool = False):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        m = self.manifest
        self.block_size = int(m["block_size"])
        self.vocab_size = int(m["vocab_size"])
        self.eos_token_id = m["eos_token_id"]
        self.dtype = np.dtype(m["dtype"])
        self._check_files(verify)
        masked = m["version"] == VERSION_MASKED
        self.splits = {name: SplitBlocks(self.folder, name, info, self.block_size, self.dtype, masked)
                       for name, info in m["splits"].items()}

    def _check_files(self, verify: bool) -> None:
        """Each listed file is a regular file inside the folder, of the size its n_blocks say; with `verify`, its
        sha256 matches and (in the same read) every token id is below vocab_size, every flag byte a known bit."""
        ids = (self.dtype, self.vocab_size, f"token id {{}}, but the manifest's vocab_size is {self.vocab_size}")
        flags = (np.dtype(np.uint8), (LOSS | START) + 1, f"flag byte {{}}, but only bits {LOSS} and {START} exist")
        for info in self.manifest["splits"].values():
            for shard in info["shards"]:
                files = [(shard["file"], shard["sha256"], self.block_size * self.dtype.itemsize, ids)]
                if self.manifest["version"] == VERSION_MASKED:
                    files.append((shard["mask_file"], shard["mask_sha256"], self.block_size, flags))
                for file, sha, per_block, (dtype, limit, what) in files:
                    path = self._check_file(file, shard["n_blocks"], per_block)
                    digest, top = scan(path, dtype) if verify else (sha, None)
                    if digest != sha:
                        raise UserError(f"{path}: sha256 does not match the manifest (corrupted); "
                                        f"re-run prepare with --overwrite")
                    if top is not None and top >= limit:
                        raise UserError(f"{path}: holds {what.format(top)}; it does not belong to this manifest "
                                        f"(re-run prepare with --overwrite)")

    def _check_file(self, name: str, n_blocks: int, per_block: int) -> Path:
        path, expected = self.folder / name, n_blocks * per_block
        if not path.is_file():
            raise UserError(f"{path}: shard listed in the manifest is missing; re-run prepare")
        if path.resolve().parent != self.folder.resolve():  # a symlink out of the folder (names are plain: schema)
            raise UserError(f"{path}: a link to {path.resolve()}, outside {self.folder}; a prepared folder's shards "
                            f"are its own files (copy them in, or re-run prepare)")
        if path.stat().st_size != expected:
            raise UserError(f"{path}: {path.stat().st_size} bytes, the manifest says {n_blocks} blocks = {expected} "
                            f"bytes (truncated or corrupted); re-run prepare with --overwrite")
        return path

    def split(self, name: str) -> SplitBlocks:
        if name not in self.splits:
            raise UserError(f"{self.folder}: no split {name!r}; splits here: {', '.join(self.splits)}")
        return self.splits[name]

    def close(self) -> None:
        for s in self.splits.values():
            s.close()
