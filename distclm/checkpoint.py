"""Checkpoints: atomic save, exact O(1) resume, Hugging Face export.

RUN/checkpoints/step-N/
    COMPLETE            written last: a folder without it is ignored (and cleaned up later)
    meta.json           step, sampler state (seed, epoch, step in epoch, samples consumed), world size,
                        strategy, and what must match to resume (model, data fingerprint, global batch)
    config.yaml         the run's resolved config (and ds_config.json under DeepSpeed)
    model/              Hugging Face folder: full weights (safetensors), config, tokenizer
    optimizer.pt        DDP: optimizer state (torch.save of tensors only: loads with weights_only=True)
    deepspeed/          ZeRO: DeepSpeed's own shards (model + optimizer partitions), as they are
    universal/          ZeRO, made on demand: the shards converted for another world size (see below)
    scheduler.json      LambdaLR state (its step count)
    rng-rank{R}.pt      torch RNG states of each rank (tensors only)

A checkpoint is written into checkpoints/.tmp-step-N by every rank, fsynced, renamed to step-N by
rank 0, then COMPLETE is written; older ones are pruned to `keep_last` only after that.

Another world size: the sampler state depends on the world only through the global batch, which
must be unchanged, so the data order continues exactly. DDP state is replicated (full weights +
full optimizer state) and loads as is. ZeRO shards are partitioned by world size and DeepSpeed
refuses to load them onto another one; they are converted once (rank 0, DeepSpeed's
ds_to_universal) into universal/ inside the checkpoint and loaded with `load_universal`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from distclm import dist
from distclm.data.blocks import fsync_dir
from distclm.errors import UserError

COMPLETE = "COMPLETE"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
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


def is_deepspeed(strategy: str) -> bool:
    return strategy != "ddp"


def needs_universal(meta: dict, strategy: str, world: int) -> bool:
    """ZeRO shards written by another world size must go through a universal checkpoint."""
    return is_deepspeed(strategy) and is_deepspeed(meta.get("strategy", "ddp")) and meta.get("world_size") != world


def ensure_universal(path: Path) -> Path:
    """`path`/universal: the ZeRO shards as a DeepSpeed universal checkpoint (rank 0 converts once; all wait).

    Written like a checkpoint: into a temporary folder, fsynced, renamed, then COMPLETE; a later
    resume from the same checkpoint on another world size reuses it.
    """
    from distclm.accel import to_universal

    out = path / "universal"
    if dist.is_rank0() and not (out / COMPLETE).exists():
        tmp = path / ".tmp-universal"
        for stale in (tmp, out):
            if stale.exists():
                shutil.rmtree(stale)
        try:
            to_universal(path / "deepspeed" / "state", tmp / "state")
        except PermissionError:
            raise UserError(f"cannot resume from {path} on another world size: its folder is read-only and the "
                            f"ZeRO shards must be converted there; copy the checkpoint somewhere writable") from None
        _fsync_tree(tmp)
        os.replace(tmp, out)
        _write_marker(out, "universal\n")
    dist.barrier()
    return out


def _write_marker(folder: Path, text: str) -> None:
    with open(folder / COMPLETE, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(folder)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def save_checkpoint(run, step: int, meta: dict) -> Path:
    """Write checkpoint `step` atomically (all ranks call this)."""
    engine = run.engine
    root = checkpoints_dir(run.dir)
    tmp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    if dist.is_rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    engine.wait()
    if engine.deepspeed:
        engine.model.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
    save_model_folder(run, tmp / "model")
    if dist.is_rank0():
        if not engine.deepspeed:
            torch.save(engine.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "scheduler.json").write_text(json.dumps(engine.scheduler.state_dict(), default=float) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        for name in ("config.yaml", "ds_config.json"):  # the resolved settings this state was trained with
            if (run.dir / name).exists():
                shutil.copy2(run.dir / name, tmp / name)
    torch.save(rng_state(), tmp / f"rng-rank{dist.rank()}.pt")
    engine.wait()
    if dist.is_rank0():
        _fsync_tree(tmp)
        if final.exists():  # a crashed run's complete step-N is replaced by this identical step
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        _write_marker(final, f"{step}\n")
        prune(run.dir, run.cfg.train.keep_last)
    engine.wait()
    return final


def prune(run_dir: Path, keep_last: int) -> None:
    """Drop complete checkpoints beyond the newest `keep_last`, and leftovers of interrupted saves."""
    found = complete_checkpoints(run_dir)
    for old in found[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    root = checkpoints_dir(run_dir)
    newest = step_of(found[-1]) if found else -1
    for leftover in root.glob(".tmp-step-*"):
        if int(leftover.name.rsplit("-", 1)[1]) <= newest:
            shutil.rmtree(leftover, ignore_errors=True)
    for partial in root.glob("step-*"):
        if partial.is_dir() and not (partial / COMPLETE).exists():
            shutil.rmtree(partial, ignore_errors=True)


def save_model_folder(run, out: Path) -> None:
    """Full weights as a Hugging Face folder (ZeRO-3 shards gathered first), plus the tokenizer."""
    engine = run.engine
    state = engine.accelerator.get_state_dict(engine.model)  # all ranks take part under ZeRO-3
    # torch.compile names every weight "_orig_mod.<name>": save the plain names a Hugging Face folder needs.
    if state is not None:  # ZeRO-3 gathers the full state on rank 0 only
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if dist.is_rank0():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model = engine.unwrap()
        model.save_pretrained(out, state_dict=drop_tied_copies(model, state), safe_serialization=True)
        check_full_weights(model, out)
        from distclm.model import load_model_tokenizer

        tok = load_model_tokenizer(run.cfg.model.name, run.cfg.data.tokenizer)
        tok.save_pretrained(out)
        write_generation_config(run.cfg, out)


def drop_tied_copies(model, state: dict) -> dict:
    """Keep one name per tied parameter (GPT-2's lm_head is its wte): under DeepSpeed the gathered state
    holds separate copies, which save_pretrained would write twice (2x the file size)."""
    seen, drop = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            drop.add(name)
        seen.add(id(param))
    return {k: v for k, v in state.items() if k not in drop}


def check_full_weights(model, out: Path) -> None:
    """The known ZeRO-3 failure writes each rank's empty placeholders: at least params x dtype bytes must be there."""
    # ds_numel: the full size of a ZeRO-3 partitioned parameter (its local tensor is empty); parameters()
    # yields a tied parameter once.
    expected = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    if written < expected:
        raise RuntimeError(f"{out}: {written:,} bytes of weights for {expected:,} bytes of parameters; the ZeRO-3 "
                           f"shards were not gathered (stage3_gather_16bit_weights_on_model_save must be true)")


def write_generation_config(cfg, out: Path) -> None:
    """The tutorial's sampling defaults, so pipeline("text-generation") samples like `distclm generate`."""
    from transformers import GenerationConfig

    g = cfg.gen
    GenerationConfig(do_sample=g.do_sample, top_k=g.top_k, top_p=g.top_p, temperature=g.temperature,
                     max_new_tokens=g.max_new_tokens, bos_token_id=50256, eos_token_id=50256,
                     pad_token_id=50256).save_pretrained(out)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rng_state(path: Path) -> None:
    if not path.exists():  # another world size: this rank had no state; dropout streams start fresh
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_compatible(meta: dict, expected: dict, strategy: str, path: Path) -> None:
    """Refuse to resume onto another model, data, global batch or kind of state, naming what differs."""
    for key, flag in (("model", "--model.name"), ("data_fingerprint", "--data.dir"),
                      ("global_batch", "--train.micro_batch_size x --train.grad_accum x world size"),
                      ("block_size", "--data.dir block_size"), ("seed", "--train.seed")):
        if meta.get(key) != expected.get(key):
            raise UserError(f"cannot resume from {path}: {key} was {meta.get(key)!r}, now {expected.get(key)!r} "
                            f"({flag}); use the original setting, another --run.dir, or --run.resume=none")
    was = meta.get("strategy", "ddp")
    if is_deepspeed(was) != is_deepspeed(strategy) or (is_deepspeed(was) and was != strategy):
        raise UserError(f"cannot resume from {path}: it was written with --train.strategy={was}, now {strategy}; "
                        f"resume with --train.strategy={was} (or start fresh with --run.resume=none)")


def load_checkpoint(run, path: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG from `path`; returns its meta (the step to continue from)."""
    engine = run.engine
    meta = read_meta(path)
    sched = getattr(engine.scheduler, "scheduler", engine.scheduler)  # accelerate wraps our LambdaLR
    # This run's hyper-parameters per group (weight decay 0 on biases/LayerNorm, betas, eps), to restore
    # after the load: DeepSpeed's ZeRO-3 universal loader copies group 0's onto every group.
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in sched.optimizer.param_groups]
    if engine.deepspeed:
        if not (path / "deepspeed").is_dir():
            raise UserError(f"cannot resume from {path}: it was written without DeepSpeed (--train.strategy=ddp); "
                            f"resume with --train.strategy=ddp")
        # Another world size: the universal copy (the engine was built with load_universal for it).
        folder = ensure_universal(path) if needs_universal(meta, run.cfg.train.strategy, dist.world_size()) \
            else path / "deepspeed"
        load_path, _ = engine.model.load_checkpoint(str(folder), tag="state",
                                                     load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"cannot resume from {path}: DeepSpeed found no loadable state under deepspeed/")
    else:
        if not (path / "optimizer.pt").exists():
            raise UserError(f"cannot resume from {path}: it holds ZeRO shards (written with a ZeRO strategy); "
                            f"resume with the same --train.strategy")
        from safetensors.torch import load_file

        state = {}
        for f in sorted((path / "model").glob("*.safetensors")):
            state.update(load_file(f))
        missing, unexpected = engine.unwrap().load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise UserError(f"cannot resume from {path}: weights do not match the model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        engine.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    engine.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    # The lr of the next step comes from the schedule: a universal reload leaves the optimizer's lr at
    # whatever the converter kept, and the first resumed step would use it.
    assert len(hyper) == len(sched.optimizer.param_groups), "the optimizer's groups changed during the load"
    for group, h, lr in zip(sched.optimizer.param_groups, hyper, sched.get_last_lr()):
        group.update(h)
        group["lr"] = lr
    # DeepSpeed's ZeRO-3 universal loader gives every group the SAME `step` tensor; AdamW increments it
    # in place once per group, so Adam's bias correction ran ahead (losses drifted ~1e-2 in 10 steps).
    for state in sched.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    load_rng_state(path / f"rng-rank{dist.rank()}.pt")
    return meta


def export_run(run_dir: Path, out: Path | None = None) -> Path:
    """Copy the newest complete checkpoint's full-weight model folder to RUN/export (or `out`), atomically."""
    found = complete_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no complete checkpoint to export; train first (checkpoints/step-N/COMPLETE)")
    out = Path(out) if out else run_dir / "export"
    if dist.is_rank0():
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(found[-1] / "model", tmp)
        _fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()
    return out
