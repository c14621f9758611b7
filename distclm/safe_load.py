"""No code from files (issue 28, rule 2): nothing distclm reads from a run, data or model folder runs code.

`torch.load` unpickles, and a pickle can call anything (a `__reduce__` that returns `os.system`). distclm's own
loads pass `weights_only=True`; DeepSpeed's (model states, ZeRO optimizer partitions, universal checkpoints,
ds_to_universal, zero_to_fp32) pass `weights_only=False` explicitly. So one rule for the whole process rather than a
patch per call site: `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`, which torch reads on every load and which wins over what the
caller passes (torch/serialization.py), set before any command runs and inherited by child processes. The few
non-tensor types DeepSpeed's files really hold are allow-listed where DeepSpeed is imported
(engine/zero_files.py `allow_deepspeed_types`). transformers loads `pytorch_model.bin` weights-only too.

A file that needs more than that is refused with one line naming it (`refusing_code`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from distclm.errors import UserError, first_line

FORCE, FORCE_NOT = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
PICKLED = (".pt", ".pth", ".bin", ".pkl", ".ckpt")  # names torch.save files go by

# The non-tensor types DeepSpeed's checkpoint files hold, found with torch.serialization.
# get_unsafe_globals_in_checkpoint on ddp, zero1/2/3 checkpoints (2 ranks) and their universal copies: data, no code.
#   LossScaler         ZeRO 1-3 optim states and universal optimizer_state.pt: `loss_scaler`, the static scale (fp32
#                      and bf16 runs)
#   DynamicLossScaler  the same field in an fp16 run (--train.precision=fp16, GPU): the dynamic scale's counters
#   ZeroStageEnum      ZeRO 1-3 optim states and universal optimizer_state.pt: `zero_stage`
#   fragment_address   ZeRO 1-2 optim states: `param_slice_mappings`, each weight's (numel, start) in a partition
# DDP's optimizer.pt, ZeRO model states and universal fp32/exp_avg/step files hold tensors and builtins only.
# engine/zero_files.py registers them (torch.serialization.add_safe_globals) where DeepSpeed is imported.
DEEPSPEED_TYPES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                   "deepspeed.runtime.zero.config.ZeroStageEnum",
                   "deepspeed.utils.tensor_fragment.fragment_address")
# Some Pythons (Debian bookworm's 3.11.2, the image's) pickle an Enum member by name, as getattr(ZeroStageEnum,
# "gradients"), where others pickle it by value. A plain getattr would let a file call anything it can reach, so
# weights-only loads get enum_member in its place: an allow-listed Enum's member, and nothing else.
ENUM_GETATTR = "builtins.getattr"


def enum_member(cls, name):
    """What a pickle's getattr(cls, name) may be in a weights-only load: a member of one of DEEPSPEED_TYPES' Enums;
    anything else is refused as the code it would run (pickle.UnpicklingError: refusing_code makes it one line)."""
    import enum
    from pickle import UnpicklingError

    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and \
            f"{cls.__module__}.{cls.__qualname__}" in DEEPSPEED_TYPES and name in cls.__members__:
        return cls[name]
    raise UnpicklingError(f"getattr({getattr(cls, '__qualname__', type(cls).__name__)}, {name!r}) is not a "
                                 f"member of an allow-listed Enum")


def forbid_code_from_files() -> None:
    """Every torch.load of this process and its children: weights only. (Both variables set is an error in torch;
    the one that would let a file run code goes.)"""
    os.environ.pop(FORCE_NOT, None)
    os.environ[FORCE] = "1"


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """forbid_code_from_files for the block (cli.main: a command, and the processes it starts), the environment
    restored after it for a program that runs main() inside its own process (the tests' in-process calls)."""
    saved = {k: os.environ.get(k) for k in (FORCE, FORCE_NOT)}
    forbid_code_from_files()
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def unsafe_globals(path: Path) -> list[str]:
    """What loading `path` would call beyond torch's safe set and DEEPSPEED_TYPES, read from its pickle's opcodes
    (nothing is run); a pickle that is not a torch.save archive counts as unsafe as a whole; [] for anything else."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        return sorted(set(get_unsafe_globals_in_checkpoint(str(path))) - set(DEEPSPEED_TYPES) - {ENUM_GETATTR})
    except ValueError:  # not a torch.save zip archive
        pass
    except Exception:  # noqa: BLE001 - an unreadable or truncated archive: not this rule's to explain
        return []
    with open(path, "rb") as f:
        head = f.read(1)
    return ["a bare pickle"] if head == b"\x80" else []  # the PROTO opcode: pickle protocol 2 and later


def find_unsafe(where: Path) -> tuple[Path, list[str]] | None:
    """The first torch.save file under `where` (a folder, or one file) holding code -> (file, what it calls)."""
    where = Path(where)
    files = [where] if where.is_file() else sorted(p for p in where.rglob("*") if p.suffix in PICKLED
                                                   and p.is_file())
    for path in files:
        found = unsafe_globals(path)
        if found:
            return path, found
    return None


CHECKPOINT_FIX = "put back the file distclm wrote, or resume from another checkpoint (--run.resume=PATH)"


def refusal(path: Path, what: list[str], fix: str = CHECKPOINT_FIX) -> str:
    """The one line for `path`, which holds `what` (callables a load would run)."""
    return (f"refusing to load {path}: it holds {', '.join(what[:3])}, which loading would run as code (distclm "
            f"loads tensors and DeepSpeed's own checkpoint types only); {fix}")


def refuse_code(where: Path, fix: str = CHECKPOINT_FIX) -> None:
    """Before loading the files under `where`: one line naming the first that holds code. Reads only (every rank
    can call it, before any collective of the load, and they all agree)."""
    hit = find_unsafe(where)
    if hit is not None:
        raise UserError(refusal(*hit, fix))


@contextlib.contextmanager
def refusing_code(where: Path, fix: str = CHECKPOINT_FIX) -> Iterator[None]:
    """Around loads of the files under `where`: a weights-only refusal that refuse_code did not foresee (a file
    that appeared meanwhile, a pickle built to hide its calls) is one line too."""
    from pickle import UnpicklingError  # torch's weights-only refusal (nothing here unpickles)

    try:
        yield
    except UnpicklingError as exc:
        hit = find_unsafe(where) or (_holding(where, ENUM_GETATTR) or Path(where), [_reason(exc)])
        raise UserError(refusal(*hit, fix)) from None


def _holding(where: Path, name: str) -> Path | None:
    """The first torch.save file under `where` whose pickle names `name` (module.name; its bytes are read, nothing is
    run). By bytes, not get_unsafe_globals_in_checkpoint: once registered, a global is no longer listed there."""
    import zipfile

    where = Path(where)
    for path in [where] if where.is_file() else sorted(p for p in where.rglob("*") if p.suffix in PICKLED):
        try:
            with zipfile.ZipFile(path) as archive:
                pickles = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        except (OSError, zipfile.BadZipFile):  # not a torch.save archive: not the one
            continue
        if any(name.rsplit(".", 1)[1].encode() in data for data in pickles):
            return path
    return None


def _reason(exc: BaseException) -> str:
    """torch's weights-only refusal quotes the unpickler's own reason after pages of advice: that line."""
    text = str(exc)
    after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
    return (next((line.strip() for line in after.splitlines() if line.strip()), "") or first_line(exc))[:200]
