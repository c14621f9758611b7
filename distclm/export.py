"""`distclm export`, and the end of training: a run's newest complete checkpoint as a Hugging Face folder.

    RUN/export/   config.json, tokenizer, generation_config.json, model*.safetensors (+ adapter/ with LoRA)

Full weights in the checkpoint are copied. Otherwise (ZeRO-3 shards, LoRA's adapter) they are written one module
at a time (hf_folder.py bounds the writer's memory): gathered from the live engine at the end of training, or, in
`distclm export` (one process, no process group), read from the memory-mapped ZeRO shards, or the base model
rebuilt from --model.name and the adapter merged into it.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from distclm import dist, hub_push, model_card
from distclm.atomic import atomic_dir, check_writable, disk_full_is_one_line, publish_dir
from distclm.checkpoint import complete_checkpoints
from distclm.errors import UserError
from distclm.hf_folder import check_full_weights, lazy_shard_tensors, write_weights
from distclm.ownership import check_export_target, scratch_dir


def _scratch(path: Path) -> Path:
    """The export's temporary folder, marked as an export from its first moment: the published folder carries the
    marker, and a leftover of an interrupted export is provably distclm's (anything else there is refused)."""
    return scratch_dir(path, "export")


@model_card.carded  # every export gets its README.md (distclm/model_card.py)
def export_run(run_dir: Path, out: Path | None = None, engine=None) -> Path:
    """The newest complete checkpoint as a Hugging Face folder in RUN/export (or `out`), atomically.

    Its model/ folder when it holds the weights. Otherwise (ZeRO-3, LoRA) the weights are written one module at a
    time: gathered from the live `engine` at the end of training (every rank calls this), or, for `distclm export`
    (one process), read from the checkpoint's memory-mapped ZeRO shards or rebuilt (LoRA: the base model from
    --model.name with the checkpoint's adapter). LoRA exports the merged model and export/adapter/.
    """
    found = complete_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no complete checkpoint to export; train first (checkpoints/step-N/COMPLETE)")
    ckpt, out = found[-1], Path(out) if out else Path(run_dir) / "export"
    # Replaced only when it is empty or an earlier export: checked now, and again right before it is replaced.
    check_export_target(out, Path(run_dir))
    check = partial(check_export_target, run=Path(run_dir))
    if any((ckpt / "model").glob("*.safetensors")):
        if dist.is_rank0():
            with disk_space(out, ckpt / "model"), atomic_dir(out, scratch=_scratch, check=check) as tmp:
                shutil.copytree(ckpt / "model", tmp, dirs_exist_ok=True)
        dist.barrier()
        return out
    if engine is None:
        with disk_space(out, ckpt / "model"):
            return _export_offline(ckpt, out, check)
    tmp = out.with_name(f".tmp-{out.name}")
    if engine.is_main:
        _scratch(tmp)
        shutil.copytree(ckpt / "model", tmp, dirs_exist_ok=True)
    _write_model(engine, tmp)
    if engine.is_main:
        publish_dir(tmp, out, check=check)
    engine.barrier()
    return out


@contextmanager
def disk_space(out: Path, source: Path):
    """The export's room: refused up front when the disk holds less than the `source` folder's bytes (the copy's
    need; ZeRO shards and LoRA merges need more), and a disk that fills while it is written (atomic_dir has removed
    the partial copy by then) is one line too, naming the folder and the space needed, not shutil.Error's list."""
    need = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    where = next(p for p in (out, *out.absolute().parents) if p.exists())
    free = free_bytes(where)
    if free < need:
        raise UserError(f"export to {out}: needs {mb(need)} and {where} has {mb(free)} free; free some space or "
                        f"choose another --out")
    with disk_full_is_one_line(f"export to {out}", where, f"it needs at least {mb(need)}; nothing was kept; free "
                                                          f"some space or choose another --out"):
        yield


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _write_model(engine, folder: Path) -> None:
    """The live model's weights into a Hugging Face folder (every rank calls this; rank 0 writes)."""
    from distclm import lora
    from distclm.engine import full_numel

    if not engine.has_frozen:
        write_weights(folder, engine.full_state_dict())
        expected = sum(full_numel(p) * p.element_size() for p in engine.module.parameters())
    else:
        merged = engine.full_state_dict(merge=(lora.is_lora_layer, lora.merged_layer))
        write_weights(folder, ((lora.base_name(n), t) for n, t in merged))
        adapter = dict(engine.full_state_dict(trainable_only=True))
        if engine.is_main:
            lora.save_adapter(engine.module, adapter, folder / lora.ADAPTER)
        expected = sum(full_numel(p) * p.element_size() for p in engine.module.parameters() if not p.requires_grad)
    if engine.is_main:
        check_full_weights(lora.base_model(engine.module).config, folder, expected)


def _export_offline(ckpt: Path, out: Path, check) -> Path:
    """`distclm export` without the run's processes: ZeRO-3 shards read one tensor at a time, or (LoRA) the base
    model rebuilt from the run's --model.name with the checkpoint's adapter, merged."""
    from distclm.engine import offline, zero_shards_state_dict

    with atomic_dir(out, scratch=_scratch, check=check) as tmp:
        shutil.copytree(ckpt / "model", tmp, dirs_exist_ok=True)
        if (ckpt / "trainable.safetensors").exists():
            _write_model(offline(_rebuild_lora(ckpt)), tmp)
        else:
            write_weights(tmp, lazy_shard_tensors(zero_shards_state_dict(ckpt)))
    return out


def _rebuild_lora(ckpt: Path):
    from safetensors.torch import load_file

    from distclm.config import build_config
    from distclm.lora import apply_lora
    from distclm.model import build_model

    cfg = build_config(file=str(ckpt / "config.yaml"))
    model = apply_lora(build_model(cfg.model.name, cfg.train.seed, cfg.model.trust_remote_code), cfg.lora,
                       cfg.train.seed)
    missing, unexpected = model.load_state_dict(load_file(ckpt / "trainable.safetensors"), strict=False)
    if unexpected:
        raise UserError(f"{ckpt}: its adapter does not fit the rebuilt model (unexpected {unexpected[:3]})")
    return model


def export_command(inv) -> int:
    """`distclm export RUN [--out DIR]`."""
    from distclm.runlock import LOCK, live_holder

    run_dir = inv.positional[0] if inv.positional else inv.cfg.run.dir
    if not run_dir:
        raise UserError("export needs a run dir: distclm export RUN [--out DIR]")
    if not Path(run_dir).is_dir():
        raise UserError(f"export: {run_dir}: no such run dir")
    holder = live_holder(Path(run_dir))
    if holder is not None:  # it would read a checkpoint that the job may be pruning; its own export comes at its end
        raise UserError(f"export: {run_dir} is being trained ({holder.describe()}, lock {Path(run_dir) / LOCK}); "
                        f"export when that job ends (it writes {Path(run_dir) / 'export'} itself at its end)")
    out = inv.extras.get("out") or str(Path(run_dir) / "export")
    check_writable(out, "--out", beside=True)
    out = export_run(Path(run_dir), out)
    print(f"exported {run_dir} -> {out} (load it with transformers.pipeline('text-generation', model='{out}'))")
    hub_push.push_export(inv.cfg, run_dir, out)  # --hub.repo_id: push it (distclm/hub_push.py)
    return 0
