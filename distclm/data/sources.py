"""Iterate documents as plain text, in a fixed order, from the hub, local files or the embedded corpus.

Hub ids stream through `datasets` (`streaming=True`: never materialised). Local files use direct
readers: `datasets.load_dataset("json", streaming=True)` costs ~1.2 s of set-up and ~5x more per
example than `json.loads` per line, on a job whose whole tokenize floor is ~1 s per 3 M tokens.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from distclm.errors import UserError, first_line
from distclm.hub import is_local

LOCAL_EXTS = (".jsonl", ".json", ".parquet", ".txt")


@dataclass(frozen=True)
class SourceSpec:
    """Everything that decides which documents come out, and in which order."""

    source: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    max_docs: int | None = None
    text_field: str = "text"
    join_with: str = " "
    txt_mode: str = "file"


def _ext(path: str) -> str:
    base = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(base)[1].lower()


# Corpora shipped with distclm, read offline: Python's pydoc topics as text, and chat exchanges made from them
# (distclm/assets/make_pydoc_chat.py).
EMBEDDED = ("pydoc", "pydoc-chat")
PYDOC_CHAT = Path(__file__).resolve().parent.parent / "assets" / "pydoc_chat.jsonl.gz"


def is_local_source(source: str) -> bool:
    """A path, folder or glob on this machine, or a name with a data file's extension (anything else is a hub
    dataset id)."""
    if source in EMBEDDED:
        return False
    return is_local(source) or any(ch in source for ch in "*?[") or _ext(source) in LOCAL_EXTS


def local_files(source: str) -> list[str]:
    """The files a local source names, sorted so that the document order is fixed."""
    source = os.path.expanduser(source)
    if os.path.isdir(source):
        files = sorted(str(p) for p in Path(source).rglob("*") if p.is_file() and _ext(str(p)) in LOCAL_EXTS)
        if not files:
            raise UserError(f"--data.source={source}: the folder has no {'/'.join(LOCAL_EXTS)} files (.gz ok)")
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(f for f in glob.glob(source, recursive=True) if os.path.isfile(f))
        if not files:
            raise UserError(f"--data.source={source}: the pattern matches no file")
    elif os.path.isfile(source):
        files = [source]
    else:
        raise UserError(f"--data.source={source}: no such file or folder")
    for f in files:
        if _ext(f) not in LOCAL_EXTS:
            raise UserError(f"--data.source: {f}: unsupported file type; use {', '.join(LOCAL_EXTS)} (optionally .gz)")
    return files


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path: str) -> Iterator[dict]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}); "
                                "expected one JSON object per line") from None


def _read_json(path: str) -> Iterator[dict]:
    """A .json file: JSON lines, a list of records, or {"data": [...]} (loaded whole)."""
    with _open_text(path) as fh:
        head = fh.read(1 << 16)
        fh.seek(0)
        stripped = head.lstrip()
        if stripped.startswith("{") and "\n{" in stripped.rstrip():
            yield from _read_jsonl(path)  # JSON lines with a .json name
            return
        try:
            data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a list of records or an object with one list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of records")
    yield from data


def _read_parquet(path: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable parquet file ({exc})") from None
    for batch in pf.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _read_txt(path: str, mode: str) -> Iterator[dict]:
    with _open_text(path) as fh:
        if mode == "file":
            yield {"text": fh.read()}
        elif mode == "line":
            for line in fh:
                line = line.rstrip("\n")
                if line.strip():
                    yield {"text": line}
        else:  # paragraph: blocks separated by blank lines
            para: list[str] = []
            for line in fh:
                if line.strip():
                    para.append(line.rstrip("\n"))
                elif para:
                    yield {"text": "\n".join(para)}
                    para = []
            if para:
                yield {"text": "\n".join(para)}


def _read_local(path: str, txt_mode: str) -> Iterator[dict]:
    ext = _ext(path)
    try:
        if ext == ".jsonl":
            yield from _read_jsonl(path)
        elif ext == ".json":
            yield from _read_json(path)
        elif ext == ".parquet":
            yield from _read_parquet(path)
        else:
            yield from _read_txt(path, txt_mode)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None


def _pydoc_records() -> Iterator[dict]:
    """Python's own help topics (pydoc_data.topics): ~0.46 M characters of real English, offline."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield {"id": name, "text": topics[name]}


def _hub_records(spec: SourceSpec) -> Iterator[dict]:
    from distclm.hub import ensure_offline_if_unreachable, offline_hint

    reachable = ensure_offline_if_unreachable()
    try:
        import datasets
    except ImportError:
        raise UserError("reading a hub dataset needs the `datasets` package: pip install datasets") from None
    where = f"--data.source={spec.source} (config={spec.config}, split={spec.split}, revision={spec.revision})"
    local = ("pass local files instead: --data.source=/path/to/*.parquet|*.jsonl with the same "
             f"--data.text_field={spec.text_field}")
    try:
        ds = datasets.load_dataset(spec.source, spec.config, split=spec.split, revision=spec.revision,
                                   streaming=True)
        it = iter(ds)
        first = next(it, None)
    except Exception as exc:  # noqa: BLE001 - hub/network/builder errors all mean "cannot load it"
        msg = first_line(exc)
        if not reachable:
            why = offline_hint("dataset", "--data.source")
        elif "script" in msg.lower() and spec.revision is None:
            why = f"{msg}; it is a script dataset: try --data.revision=refs/convert/parquet"
        else:
            why = f"{type(exc).__name__}: {msg}"
        raise UserError(f"{where}: cannot load the hub dataset: {why}; or {local}") from None
    if first is not None:
        yield first
        yield from it


def records(spec: SourceSpec) -> Iterator[dict]:
    """Raw records of the source, in order (before text extraction)."""
    if spec.source == "pydoc":
        return _pydoc_records()
    if spec.source == "pydoc-chat":
        return _read_local(str(PYDOC_CHAT), spec.txt_mode)
    if is_local_source(spec.source):
        files = local_files(spec.source)
        return (rec for f in files for rec in _read_local(f, spec.txt_mode))
    return _hub_records(spec)


def extract_text(record: Any, path: str, join_with: str) -> str:
    """Follow a dotted path (`answers.text`) through dicts, mapping over lists; join lists of strings."""
    value = record
    walked = []
    for part in path.split("."):
        value = _step(value, part, path, walked)
        walked.append(part)
    return _join(value, join_with)


def _step(value: Any, part: str, path: str, walked: list[str]) -> Any:
    if isinstance(value, list):
        return [_step(v, part, path, walked) for v in value]
    if isinstance(value, dict):
        if part not in value:
            at = ".".join(walked) or "the record"
            raise MissingField(f"--data.text_field={path}: field {part!r} not found in {at}; "
                               f"fields there: {', '.join(map(str, value)) or '(none)'}")
        return value[part]
    raise MissingField(f"--data.text_field={path}: {'.'.join(walked) or 'the record'} is a "
                       f"{type(value).__name__}, not a record with field {part!r}")


def _join(value: Any, join_with: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return join_with.join(_join(v, join_with) for v in value)
    return str(value)


class MissingField(UserError):
    pass


def documents(spec: SourceSpec) -> Iterator[str]:
    """The text of each document, in order: the first `max_docs` records' `text_field`."""
    recs = records(spec)
    if spec.max_docs is not None:
        recs = islice(recs, spec.max_docs)
    for i, rec in enumerate(recs):
        try:
            yield extract_text(rec, spec.text_field, spec.join_with)
        except MissingField as exc:
            raise UserError(f"{_where(spec)}, document {i}: {exc}") from None


def _where(spec: SourceSpec) -> str:
    return f"--data.source={spec.source}"
