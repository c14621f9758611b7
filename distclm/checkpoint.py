"""Checkpoints: atomic save, find, exact O(1) resume (also onto another world size).

RUN/checkpoints/step-N/
    COMPLETE         written last: a folder without it is ignored (and cleaned up later)
    meta.json        the training state: step, sampler position (epoch, step in epoch, samples consumed),
                     world size, strategy, and what must match to resume (model, data, global batch, seed)
    config.yaml      the run's resolved config (and ds_config.json under DeepSpeed)
    model/           Hugging Face config + tokenizer; full weights (safetensors) except under ZeRO-3 and LoRA
    trainable.safetensors   LoRA: the adapter's weights (the frozen base is rebuilt from --model.name)
    optimizer.pt     DDP: optimizer state (tensors only: loads with weights_only=True, as every file here: safe_load.py)
    deepspeed/       ZeRO: DeepSpeed's own shards (model + optimizer partitions), as they are
    universal/       ZeRO, made on demand: the shards converted for another world size
    scheduler.json   the schedule's step count

A ZeRO-3 checkpoint is the shards alone: nothing is gathered to save it. The export consolidates
them in bounded memory (see export.py): gathered one parameter at a time at the end of training, or
read from the memory-mapped shards by `distclm export`.

Another world size: the sampler state depends on the world only through the global batch, which must
be unchanged. DDP state is replicated and loads as is; ZeRO shards are converted once by rank 0 into
universal/ (DeepSpeed's ds_to_universal) and loaded with `load_universal`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distclm.atomic import atomic_dir, disk_full, fresh_dir, publish_dir
from distclm.errors import UserError
from distclm.safe_load import refuse_code

COMPLETE = "COMPLETE"


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / COMPLETE).exists() and p.name[5:].isdigit()]
    return sorted(found, key=step_of)


def find_resume(run_dir: Path | None, resume: str) -> Path | None:
    """The checkpoint to start from: auto = newest complete one in `run_dir` (or none), none, or a path.

    `run_dir` None: the run dir is not chosen yet (a fresh timestamped one), so auto finds nothing.
    """
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir) if run_dir is not None else []
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).exists() or not (path / "meta.json").exists():
        raise UserError(f"--run.resume={resume}: not a complete checkpoint (no {COMPLETE} marker); "
                        f"use a RUN/checkpoints/step-N folder, auto or none")
    return path


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def is_zero(strategy: str) -> bool:
    return strategy != "ddp"


def needs_universal(meta: dict, strategy: str, world: int) -> bool:
    """ZeRO shards written by another world size must go through a universal checkpoint."""
    return is_zero(strategy) and is_zero(meta.get("strategy", "ddp")) and meta.get("world_size") != world


def check_compatible(meta: dict, expected: dict, strategy: str, path: Path) -> None:
    """Refuse to resume onto another model, data, global batch or kind of state, naming what differs."""
    for key, flag in (("model", "--model.name"), ("data_fingerprint", "--data.dir"),
                      ("global_batch", "--train.micro_batch_size x --train.grad_accum x world size"),
                      ("block_size", "--data.dir block_size"), ("seed", "--train.seed"),
                      ("lora", "--lora.*")):
        if meta.get(key) != expected.get(key):
            raise UserError(f"cannot resume from {path}: {key} was {meta.get(key)!r}, now {expected.get(key)!r} "
                            f"({flag}); use the original setting, another --run.dir, or --run.resume=none")
    was = meta.get("strategy", "ddp")
    if is_zero(was) != is_zero(strategy) or (is_zero(was) and was != strategy):
        raise UserError(f"cannot resume from {path}: it was written with --train.strategy={was}, now {strategy}; "
                        f"resume with --train.strategy={was} (or start fresh with --run.resume=none)")


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(engine, run_dir: Path, meta: dict, keep_last: int, hf) -> Path:
    """Write checkpoint meta["step"] atomically; every rank calls this. `hf`: (tokenizer, gen settings).

    Out of disk space is a user error that leaves the previous checkpoint intact.
    """
    root = Path(run_dir) / "checkpoints"
    step = meta["step"]
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    try:
        _write(engine, run_dir, tmp, meta, hf)
    except (OSError, RuntimeError) as exc:
        if not _disk_full(exc, run_dir):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        kept = complete_checkpoints(run_dir)
        raise UserError(f"out of disk space writing checkpoint step-{step} under {root}; the previous checkpoint "
                        f"{kept[-1] if kept else '(none)'} is intact; free space or lower --train.keep_last, "
                        f"then relaunch to resume") from None
    if engine.is_main:
        publish_dir(tmp, final, COMPLETE, f"{step}\n")
        prune(run_dir, keep_last)
    engine.barrier()
    return final


def _write(engine, run_dir: Path, tmp: Path, meta: dict, hf) -> None:
    from safetensors.torch import save_file

    from distclm.hf_folder import write_metadata, write_weights
    from distclm.lora import base_model

    if engine.is_main:
        fresh_dir(tmp)
    engine.barrier()
    engine.save_state(tmp)
    if engine.has_frozen:  # LoRA: the adapter alone (small, gathered under ZeRO-3 too)
        adapter = dict(engine.full_state_dict(trainable_only=True))
        if engine.is_main:
            save_file(adapter, str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
    elif not engine.weights_partitioned:  # ZeRO-3: the shards alone, nothing gathered
        write_weights(tmp / "model", engine.full_state_dict())
    if engine.is_main:
        write_metadata(tmp / "model", base_model(engine.module).config, *hf)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        for name in ("config.yaml", "ds_config.json"):  # the resolved settings this state was trained with
            if (Path(run_dir) / name).exists():
                shutil.copy2(Path(run_dir) / name, tmp / name)
    engine.barrier()


def _disk_full(exc: BaseException, run_dir: Path) -> bool:
    # torch.save reports a full disk as RuntimeError("... unexpected pos ..."): look at the disk itself.
    return disk_full(exc) or shutil.disk_usage(run_dir).free < 16 * 2**20


def prune(run_dir: Path, keep_last: int) -> None:
    """Drop complete checkpoints beyond the newest `keep_last`, and leftovers of interrupted saves. Only the names
    saving makes (step-N, .tmp-step-N: N digits) in the checkpoints/ of a run dir this job holds: a folder of
    another name there is left alone, whatever it holds."""
    found = complete_checkpoints(run_dir)
    for old in found[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(run_dir) / "checkpoints"
    newest = step_of(found[-1]) if found else -1
    for leftover in root.glob(".tmp-step-*"):
        if _own_step_name(leftover, ".tmp-step-") and int(leftover.name.rsplit("-", 1)[1]) <= newest:
            shutil.rmtree(leftover, ignore_errors=True)
    for partial in root.glob("step-*"):
        if _own_step_name(partial, "step-") and not (partial / COMPLETE).exists():
            shutil.rmtree(partial, ignore_errors=True)


def _own_step_name(path: Path, prefix: str) -> bool:
    return path.name[len(prefix):].isdigit() and path.is_dir() and not path.is_symlink()


# ---------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(engine, path: Path, meta: dict) -> None:
    """Restore model, optimizer and schedule from `path` (the step to continue from is meta["step"])."""
    strategy = engine.strategy
    if is_zero(strategy) and not (path / "deepspeed").is_dir():
        raise UserError(f"cannot resume from {path}: it was written without DeepSpeed (--train.strategy=ddp); "
                        f"resume with --train.strategy=ddp")
    if not is_zero(strategy) and not (path / "optimizer.pt").exists():
        raise UserError(f"cannot resume from {path}: it holds ZeRO shards (written with a ZeRO strategy); "
                        f"resume with the same --train.strategy")
    refuse_code(path)  # on every rank, before any collective of the load: a file holding code, one line
    universal = ensure_universal(engine, path) if needs_universal(meta, strategy, engine.world) else None
    engine.load_state(path, universal)


def ensure_universal(engine, path: Path) -> Path:
    """`path`/universal/state: the ZeRO shards as a universal checkpoint (rank 0 converts once; all wait)."""
    from distclm.engine import to_universal

    out = path / "universal"  # distclm's own name inside a complete distclm checkpoint (COMPLETE, meta.json)
    if engine.is_main and not (out / COMPLETE).exists():
        try:
            with atomic_dir(out, COMPLETE, "universal\n") as tmp:
                to_universal(path / "deepspeed" / "state", tmp / "state")
        except PermissionError:
            raise UserError(f"cannot resume from {path} on another world size: its folder is read-only and the "
                            f"ZeRO shards must be converted there; copy the checkpoint somewhere writable") from None
    engine.barrier()
    return out
