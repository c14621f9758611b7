"""DeepSpeed's checkpoint files read or converted offline: one process, no process group, nothing wrapped.

    to_universal(CKPT/deepspeed/state, CKPT/universal/state)   shards -> universal checkpoint (any world)
    zero_shards_state_dict(CKPT)                               shards -> {name: lazy fp32 tensor} (export)
    deepspeed_ops(cache)                                       C++ ops this machine has or can build (doctor)
    allow_deepspeed_types()                                    what DeepSpeed's files hold beside tensors

Every torch.load here is weights-only (distclm/safe_load.py forces it for the process, DeepSpeed's weights_only=False
notwithstanding): a file holding anything else is refused with one line naming it.
"""

from __future__ import annotations

import contextlib
import io
import os
from argparse import Namespace
from pathlib import Path

from distclm.errors import UserError
from distclm.safe_load import DEEPSPEED_TYPES, ENUM_GETATTR, enum_member, refuse_code, refusing_code


def allow_deepspeed_types() -> None:
    """Let weights-only loads build safe_load.DEEPSPEED_TYPES (the why of each is there); idempotent."""
    import importlib

    import torch

    torch.serialization.add_safe_globals([getattr(importlib.import_module(m), n) for m, n in
                                          (t.rsplit(".", 1) for t in DEEPSPEED_TYPES)] +
                                         [(enum_member, ENUM_GETATTR)])  # an Enum member pickled by name


def to_universal(src: Path, dst: Path) -> None:
    """ZeRO shards (one tag folder) -> a DeepSpeed universal checkpoint that any world size loads. In this
    process, one worker (its pool would fork a process holding a process group); inject_missing_state: for
    stage 1/2."""
    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    allow_deepspeed_types()
    refuse_code(src)
    log = io.StringIO()
    try:
        with refusing_code(src), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except UserError:
        raise
    except Exception as exc:
        raise RuntimeError(f"DeepSpeed's ds_to_universal failed on {src}: {exc}\n"
                           f"{log.getvalue()[-4000:]}") from exc


def zero_shards_state_dict(folder: Path) -> dict:
    """A ZeRO checkpoint's fp32 weights as lazy tensors (`.contiguous()` reads one), files memory-mapped."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    allow_deepspeed_types()
    fix = "put back the file distclm wrote, or export another checkpoint of the run"
    refuse_code(folder / "deepspeed", fix)
    with refusing_code(folder / "deepspeed", fix), contextlib.redirect_stdout(None):
        return get_fp32_state_dict_from_zero_checkpoint(str(folder / "deepspeed"), tag="state",
                                                        lazy_mode=True)


def deepspeed_ops(cache: str) -> tuple[str, list[tuple[str, str, str, str]]]:
    """(accelerator, [(op, prebuilt, can JIT-build, built in `cache`)]) as DeepSpeed sees this machine
    (doctor)."""
    try:
        from deepspeed.git_version_info import accelerator_name, installed_ops
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
        from deepspeed.ops.op_builder.builder import probe_is_compatible
    except Exception as exc:  # not installed, or broken: say so instead of failing the whole report
        return f"unavailable ({type(exc).__name__}: {exc})", []
    rows = []
    for name, builder in sorted(ALL_OPS.items()):
        if name == "deepspeed_not_implemented":
            continue
        so = os.path.join(cache, builder.name, f"{builder.name}.so")
        rows.append((name, "yes" if installed_ops.get(name) else "no",
                     "yes" if probe_is_compatible(builder, False) else "no",
                     "built" if os.path.exists(so) else "-"))
    return accelerator_name or "(not recorded at install)", rows
