"""Writing so that a reader sees the old state or the whole new one, never a part.

One protocol for everything distclm publishes (prepared shards and manifest, checkpoints, the
universal copy of a checkpoint, the export, eval results):

    write under a temporary name -> fsync the data -> rename into place -> fsync the parent folder
    -> (folders) write the marker file last, fsynced

A crash at any point leaves either the temporary name (ignored, cleaned up later) or the complete
result. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from distclm.errors import UserError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every folder (bottom up), so a rename publishes durable data."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def publish_file(tmp: Path, final: Path) -> None:
    """An already written `tmp` -> `final`: fsync it, rename, fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (a `.tmp` sibling, fsync, rename, fsync the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        publish_file(tmp, path)
    except BaseException:  # a full disk, an interrupt: no half-written sibling is left behind
        tmp.unlink(missing_ok=True)
        raise


def fresh_dir(path: Path) -> Path:
    """An empty folder at `path` (a leftover of an interrupted write is removed first). Only for names inside a folder
    distclm owns (RUN/checkpoints/.tmp-step-N, a checkpoint's .tmp-universal): what is there is its own."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish_dir(tmp: Path, final: Path, marker: str | None = None, marker_text: str = "",
                check: Callable[[Path], None] | None = None) -> None:
    """A complete `tmp` folder -> `final`: fsync the tree, replace `final`, then write `marker` in it last. `check`
    (raises to refuse) runs on `final` right before it is replaced: what is there now, not when the write began."""
    fsync_tree(tmp)
    # An older complete copy of the same thing (a re-run step, an earlier export): replaced as a whole. The callers
    # prove it is theirs (`check`: ownership.check_export_target; a step-N name in a run dir this job holds).
    if check is not None:
        check(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if marker is not None:
        atomic_write(final / marker, marker_text.encode())


@contextmanager
def atomic_dir(final: Path, marker: str | None = None, marker_text: str = "",
               scratch: Callable[[Path], Path] = fresh_dir, check: Callable[[Path], None] | None = None
               ) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` fill `tmp`; on success it becomes `out` (marker last), on error it goes.
    `scratch` makes the empty `tmp`: fresh_dir for names inside a folder distclm owns (a checkpoint), or
    ownership.scratch_dir where the temporary name sits beside the user's own files (an export); `check`: see
    publish_dir."""
    final = Path(final)
    tmp = scratch(final.with_name(f".tmp-{final.name}"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        publish_dir(tmp, final, marker, marker_text, check)
    except BaseException:  # refused by `check` (or a failed rename): the temporary copy goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(path: str | Path, flag: str, kind: str = "folder", beside: bool = False) -> None:
    """Refuse an output path distclm could not write, before the work that would produce it (UserError, one line
    naming `flag`, the path and what is wrong). `kind`: what the output is ("folder" or "file"); `beside`: it is
    published from a temporary sibling (atomic_write's `.tmp`, atomic_dir's `.tmp-` folder), so its parent is what
    must take writes, else (a run dir, a data folder) it is written inside.

    The nearest existing ancestor must be a folder (not `FILE/x`) that takes a real probe file: `os.access` answers
    from local permission bits, which root passes (a root-squashed NFS share, a server-side read-only export or a
    full quota refuse only the real write), and a probe is the one answer every file system gives alike.
    Nothing is left but a missing folder still missing: the work itself makes it later."""
    target = Path(path).absolute()
    if target.exists() and target.is_dir() != (kind == "folder"):
        raise UserError(f"{flag}={path}: {target} is {'a folder' if target.is_dir() else 'a file'}, not a {kind}")
    where = target.parent if beside else target
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise UserError(f"{flag}={path}: {where} is a file, not a folder, so nothing can be written under it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".distclm-write-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{flag}={path}: cannot write in {where} ({exc.strerror or exc}); choose a writable "
                        f"{flag}") from None


def disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT: an OSError, one of shutil.copytree's (src, dst, why) failures, or a library's own error that
    quotes the system's message (safetensors)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(os.strerror(e) in str(exc) for e in (errno.ENOSPC, errno.EDQUOT))


@contextmanager
def disk_full_is_one_line(what: str, folder: str | Path, then: str) -> Iterator[None]:
    """A disk that fills inside the block -> UserError naming `what` (the flag and path), the folder and its free
    space, then `then` (what was kept, what to do). Any other error passes unchanged."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only a full disk becomes a user error; the rest is re-raised
        if not disk_full(exc):
            raise
        where = next(p for p in (Path(folder), *Path(folder).absolute().parents) if p.exists())
        raise UserError(f"{what}: the disk is full ({os.strerror(errno.ENOSPC).lower()} in {where}, "
                        f"{shutil.disk_usage(where).free / 1e6:,.1f} MB free); {then}") from None
