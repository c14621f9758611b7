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


def _nonblank(fh) -> Iterator[tuple[int, str]]:
    """(line number, line) of each line with something on it."""
    for lineno, line in enumerate(fh, 1):
        if line.strip():
            yield lineno, line


def _json_lines(path: str, lines) -> Iterator[dict]:
    for lineno, line in lines:
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}); "
                            "expected one JSON object per line") from None


def _read_jsonl(path: str) -> Iterator[dict]:
    with _open_text(path) as fh:
        yield from _json_lines(path, _nonblank(fh))


_NOTHING = object()


def _json_head(fh) -> tuple[str, object]:
    """How a .json file holds its records, from its first two non-blank lines (then rewound):

        ("lines", _)        JSON Lines: an object alone on the first line and more lines after it. No single JSON
                            document starts that way (a complete value followed by more is not JSON), so any
                            later line that is not an object is an error with its line number, never a guess.
        ("document", v)     one JSON document: anything else (pretty-printed with indent=0/2/..., a one-line
                            list, a lone object); `v` is it already parsed when it was the file's only line.

    An empty file is JSON Lines with no records. JSON Lines is read in one pass; a document is loaded whole."""
    lines = _nonblank(fh)
    head = next(lines, None)
    value = _NOTHING
    if head is not None and head[1].lstrip().startswith("{"):  # a record line is an object: lists are documents
        try:
            value = json.loads(head[1])
        except json.JSONDecodeError:
            pass
    more = next(lines, None) is not None
    fh.seek(0)
    if head is None or (isinstance(value, dict) and more):
        return "lines", None
    return "document", (value if not more else _NOTHING)


def _read_json(path: str) -> Iterator[dict]:
    """A .json file: JSON Lines, or one document (_json_head decides): a list of records, an object with one list
    of records ({"version": 1, "data": [...]}), or one record."""
    with _open_text(path) as fh:
        kind, data = _json_head(fh)
        if kind == "lines":
            yield from _json_lines(path, _nonblank(fh))
            return
        if data is _NOTHING:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); expected a list of records, "
                                f"an object holding one, or JSON Lines") from None
    yield from _records_in(path, data)


def _records_in(path: str, data) -> list:
    """The records of a JSON document: a list of them; an object whose one list of objects they are (a wrapper
    such as {"version": 1, "data": [...]}); else the object itself is the one record. A list of {role, ...}
    objects is a conversation, not records: {"messages": [...]} alone in a file is one chat record."""
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        raise UserError(f"{path}: a JSON {type(data).__name__}, not records; expected a list of records, an object "
                        f"holding one, or JSON Lines")
    lists = [v for v in data.values() if isinstance(v, list) and all(isinstance(x, dict) for x in v)
             and not (v and all("role" in x for x in v))]
    return lists[0] if len(lists) == 1 else [data]


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
    except UnicodeDecodeError:
        raise UserError(_bad_utf8(path)) from None
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None


def _bad_utf8(path: str) -> str:
    """`FILE:LINE: ...` for the first byte of `path` that is not UTF-8. The text reader's error has no position
    (it decodes in buffered chunks), so the file is read again as bytes: on this error only."""
    opener = gzip.open if path.endswith(".gz") else open
    base, newlines, pending = 0, 0, b""  # data[0]'s offset in the (uncompressed) bytes, newlines before it
    with opener(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            data = pending + chunk
            try:
                data.decode("utf-8")
                pending, cut = b"", len(data)
            except UnicodeDecodeError as exc:
                if exc.reason != "unexpected end of data":  # not a character cut by the chunk's end
                    return _utf8_line(path, base + exc.start, newlines + data.count(b"\n", 0, exc.start) + 1,
                                      exc.reason)
                pending, cut = data[exc.start:], exc.start
            newlines += data.count(b"\n", 0, cut)
            base += cut
    return _utf8_line(path, base, newlines + 1, "the file ends inside a character")


def _utf8_line(path: str, offset: int, line: int, reason: str) -> str:
    where = "of the uncompressed text" if path.endswith(".gz") else ""
    return (f"{path}:{line}: not valid UTF-8 at byte offset {offset}{' ' + where if where else ''} ({reason}); "
            f"save the file as UTF-8")


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


def locate(specs: list[SourceSpec], position: int) -> str:
    """Where record `position` of these streams (read in order, each cut at its max_docs) is, for an error line:
    FILE:LINE in JSON Lines, `FILE: record I` in a JSON document, `FILE: row I` in parquet. It reads the input
    again up to that record: for an error only."""
    for spec in specs:
        for where in islice(_wheres(spec), spec.max_docs):
            if position == 0:
                return where
            position -= 1
    return f"record {position}"


def _wheres(spec: SourceSpec) -> Iterator[str]:
    """The location of each record of `spec`, in the order records() gives them."""
    if spec.source == "pydoc-chat" or is_local_source(spec.source):
        for f in ([str(PYDOC_CHAT)] if spec.source == "pydoc-chat" else local_files(spec.source)):
            ext = _ext(f)
            if ext == ".json":
                with _open_text(f) as fh:
                    ext = ".jsonl" if _json_head(fh)[0] == "lines" else ext
            if ext == ".jsonl":
                with _open_text(f) as fh:
                    yield from (f"{f}:{lineno}" for lineno, _ in _nonblank(fh))
            else:
                unit = {".json": "record", ".parquet": "row"}.get(ext, "document")
                yield from (f"{f}: {unit} {i}" for i, _ in enumerate(_read_local(f, spec.txt_mode)))
    else:
        yield from (f"--data.source={spec.source}: record {i}" for i, _ in enumerate(records(spec)))


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
