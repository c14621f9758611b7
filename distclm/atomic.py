"""Writing so that a reader sees the old state or the whole new one, never a part.

One protocol for everything distclm publishes (prepared shards and manifest, checkpoints, the
universal copy of a checkpoint, the export, eval results):

    write under a temporary name -> fsync the data -> rename into place -> fsync the parent folder
    -> (folders) write the marker file last, fsynced

A crash at any point leaves either the temporary name (ignored, cleaned up later) or the complete
result. Nothing here imports torch.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


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
    with open(tmp, "wb") as fh:
        fh.write(data)
    publish_file(tmp, path)


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
