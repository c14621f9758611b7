"""Ownership: distclm deletes or replaces only what it can prove it wrote.

Every folder distclm writes carries a marker file of its kind, written through atomic.py's protocol when the folder
is claimed (before anything else goes in, so an interrupted write is provably distclm's too):

    distclm-owner.json     {"kind": "data" | "run" | "export", "distclm_version": "0.1.0"}

A distclm folder of another kind is not its own: a prepared dataset is not an export, a run is not an export. A
folder that is neither empty nor distclm's of the asked kind is refused with one line that says what is there and
how to choose another path; --overwrite replaces only distclm's own output of the same kind.

Folders written by distclm before the marker existed are recognised by their own signs (kind_of), so that their
runs keep resuming and their prepares keep completing: a data folder by a manifest.json of format
"distclm-blocks" (or the resume state of an interrupted prepare), a run dir by config.yaml beside checkpoints/ (or
beside data-verified.json: a run stopped before its first checkpoint), or by a complete checkpoint in checkpoints/
(step-N with COMPLETE and meta.json: what a stopped run leaves, copied into a fresh folder to resume).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from distclm import __version__
from distclm.atomic import atomic_write
from distclm.errors import UserError

MARKER = "distclm-owner.json"
KINDS = {"data": "a prepared dataset (distclm prepare)", "run": "a run dir (distclm train)",
         "export": "an export (distclm export)"}
SHOWN = 4  # names quoted when a refusal says what a folder holds


def write_marker(folder: Path, kind: str) -> None:
    assert kind in KINDS, kind
    atomic_write(Path(folder) / MARKER, (json.dumps({"kind": kind, "distclm_version": __version__}) + "\n").encode())


def _marker_kind(folder: Path) -> str | None:
    try:
        kind = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in KINDS else None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def kind_of(folder: Path) -> str | None:
    """The kind of distclm folder `folder` is, or None (not a folder distclm wrote, or not a folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (kind := _marker_kind(folder)) is not None:
        return kind
    # Legacy (written before the marker): these files have distclm's own names and shapes.
    manifest, state = _read_json(folder / "manifest.json"), _read_json(folder / ".prepare-state.json")
    if isinstance(manifest, dict) and manifest.get("format") == "distclm-blocks":
        return "data"
    if isinstance(state, dict) and {"fingerprint", "next_doc", "splits"} <= set(state):
        return "data"
    if (folder / "config.yaml").is_file() and ((folder / "checkpoints").is_dir()
                                               or (folder / "data-verified.json").is_file()):
        return "run"
    if any((step / "COMPLETE").is_file() and (step / "meta.json").is_file()
           for step in (folder / "checkpoints").glob("step-*")):
        return "run"  # a complete checkpoint copied into a fresh folder to resume from
    return None


def entries(folder: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """The names in `folder` (folders with a trailing /), sorted, except `ignore`; [] when it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name not in ignore)


def describe(folder: Path, ignore: tuple[str, ...] = ()) -> str:
    """What `folder` holds, for a refusal: its kind when distclm wrote it, else a few of its names."""
    kind = kind_of(folder)
    if kind is not None:
        return f"is {KINDS[kind]}"
    names = entries(folder, ignore)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    count = f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}"
    return f"holds {count} distclm did not write ({', '.join(names[:SHOWN])}{more})"


def check_claimable(folder: Path, kind: str, flag: str, ignore: tuple[str, ...] = ()) -> bool:
    """Whether `folder` is distclm's folder of `kind` (True) or new / empty (False); anything else is refused,
    naming `flag`. Reads only. `ignore`: names that do not make a folder non-empty (a lock being taken)."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists() or folder.exists() and not folder.is_dir():
        raise UserError(f"{flag}={folder}: exists and is not a folder; choose another {flag}")
    found = kind_of(folder)
    if found is None and entries(folder, ignore + (MARKER,)):
        raise UserError(f"{flag}={folder} {describe(folder, ignore)}; distclm writes only into a new or empty folder, "
                        f"or into {KINDS[kind]} it made before: choose another {flag}")
    if found is not None and found != kind:
        raise UserError(f"{flag}={folder} is {KINDS[found]}, not {KINDS[kind]}; choose another {flag}")
    return found == kind


def claim_dir(folder: Path, kind: str, flag: str, ignore: tuple[str, ...] = ()) -> bool:
    """check_claimable, then the folder created and marked as `kind` (a legacy one gets its marker now).
    -> whether it already was distclm's of `kind`."""
    own = check_claimable(folder, kind, flag, ignore)
    Path(folder).mkdir(parents=True, exist_ok=True)
    if _marker_kind(Path(folder)) != kind:
        write_marker(Path(folder), kind)
    return own


def scratch_dir(path: Path, kind: str) -> Path:
    """An empty temporary folder at `path`, marked as `kind` at once, so that a leftover of an interrupted write is
    provably distclm's: such a leftover is removed first, anything else at `path` is refused."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if path.is_symlink() or _marker_kind(path) != kind:
            raise UserError(f"{path}: distclm needs this name for a temporary folder, and what is there was not "
                            f"written by distclm; move it away, or choose another output path")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    write_marker(path, kind)
    return path


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_export_target(out: Path, run: Path) -> None:
    """Refuse an export folder that distclm may not replace: the run itself or anything inside it but its own
    export/, a folder that holds the run, the current folder or one above it, and any existing folder that is
    neither empty nor an earlier export (a run, a prepared dataset, a model folder, anything of the user's)."""
    out_r, run_real = Path(os.path.abspath(out)), Path(run).resolve()
    out_real = out_r.resolve()
    if out_r.is_symlink() or (out_r.exists() and not out_r.is_dir()):
        raise UserError(f"--out {out} exists and is not a folder (a file or a link); choose another --out")
    if out_real == run_real / "export":
        return  # the run's own export/ (also one written before the marker existed)
    if out_real == run_real:
        raise UserError(f"--out {out} is the run itself; choose a new folder for the export, "
                        f"e.g. --out {run_real.name}-hf")
    if _inside(out_real, run_real):
        raise UserError(f"--out {out} is inside the run {run} (only its own export/ may be written there); "
                        f"choose a folder outside the run, e.g. --out {run_real.name}-hf")
    if _inside(run_real, out_real):
        raise UserError(f"--out {out} holds the run {run}; choose a new folder for the export, e.g. "
                        f"--out {run_real.name}-hf")
    if _inside(Path.cwd().resolve(), out_real):
        raise UserError(f"--out {out} is the current folder (or holds it); choose a new folder for the export, "
                        f"e.g. --out {run_real.name}-hf")
    if kind_of(out_r) == "export":
        nested = _foreign_inside(out_r)
        if nested is not None:
            raise UserError(f"--out {out} is an earlier export, but {nested} inside it {describe(nested)}; "
                            f"choose another --out")
        return
    held = next((p for p in sorted(out_r.iterdir()) if kind_of(p) in ("run", "data")), None) \
        if out_r.is_dir() else None
    if held is not None:
        raise UserError(f"--out {out} holds {KINDS[kind_of(held)]} ({held}); choose a new folder for the export")
    if entries(out_r):
        raise UserError(f"--out {out} {describe(out_r)}; distclm export replaces only an empty folder or an earlier "
                        f"export: choose another --out")


def _foreign_inside(export: Path) -> Path | None:
    """A folder inside an earlier export that distclm must not replace with it (a run or dataset put there)."""
    for root, dirs, _files in os.walk(export):
        for name in dirs:
            if kind_of(Path(root) / name) in ("run", "data"):
                return Path(root) / name
    return None
