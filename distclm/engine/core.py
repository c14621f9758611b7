"""The Engine: the process group, DDP or ZeRO around the model, one optimizer step, state I/O.

Everything else in distclm talks to an `Engine`:

    engine = Engine.start(cfg.train, shape.hidden_size)      # process group; DeepSpeed config registered
    model = build_model(...)                                  # ZeRO-3: transformers builds it partitioned
    engine.wrap(model, total_steps)                           # optimizer, schedule, DDP | ZeRO
    with engine.micro_batch(last=...): engine.backward(loss)  # gradients synchronised on the last one
    grad_norm = engine.optimizer_step()                       # clip, step, zero, schedule

DDP on CPU needs `Accelerator(cpu=True)` (else several CPU processes stay unwrapped and the ranks silently
diverge), while `cpu=True` turns DeepSpeed off: so for DDP only. The lr schedule is ours, stepped once per
optimizer step (accelerate or DeepSpeed would step it per process or per micro-batch).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch

from distclm import dist, ds_config, exit_code, optim
from distclm.dist import form_process_group, pick_backend, pick_precision, return_freed_memory
from distclm.engine.zero_files import allow_deepspeed_types
from distclm.errors import UserError
from distclm.launch_checks import check_same_versions
from distclm.moe import z3_leaves
from distclm.safe_load import refusing_code

# DeepSpeed calls torch.distributed functions that this torch deprecates (reduce_scatter_tensor,
# all_gather_into_tensor): one FutureWarning per call site on every rank, noise for a user.
warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")


class Engine:
    """The model wrapped for the strategy, its optimizer and schedule, and the collectives around them."""

    def __init__(self, t, stage: int | None, ds: dict | None, accelerator, training: bool, module=None):
        self.t, self.stage, self.ds, self.accelerator, self.training = t, stage, ds, accelerator, training
        self.world, self.rank = dist.world_size(), dist.rank()
        self.is_main = self.rank == 0
        self.device = accelerator.device if accelerator is not None else dist.device()
        self.model = self.module = module
        self.optimizer = self.scheduler = None
        self.loss = "the model's own"  # which loss the model computes (loss.install), for the console
        self._zero3_config = None
        if stage == 3:
            # Alive before the model is built: transformers then constructs and loads it under zero.Init,
            # partitioned (it holds this config through a weakref, hence the reference here).
            from transformers.integrations import HfDeepSpeedConfig

            self._zero3_config = HfDeepSpeedConfig(ds)

    @classmethod
    def start(cls, t, hidden_size: int, training: bool = True, universal: bool = False) -> "Engine":
        """Form the process group and register the DeepSpeed config; the model is built after this."""
        stage = ds_config.zero_stage(t.strategy)
        if stage == 3:
            return_freed_memory()
        ds_config.check_offload(t.strategy, t.offload)
        precision = pick_precision(t, training)
        pick_backend(t)  # nccl without a GPU fails here, before any process group
        ds = ds_config.resolve(t, dist.world_size(), hidden_size, precision) if stage is not None else None
        if ds is not None and universal:  # DeepSpeed reads this switch from the config it is built with
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
        form_process_group(t, needed=ds is not None)
        check_same_versions()  # before anything is exchanged in a format two versions may disagree on
        if ds is not None:  # DeepSpeed's own comm adopts the group (zero.Init reads the world size from it)
            import deepspeed

            # Its shared-memory op serves only DeepSpeed-inference all-reduces: not loading it saves ~2.5 s a
            # start.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
            timeout = timedelta(seconds=t.dist_timeout_s)
            deepspeed.init_distributed(dist_backend=pick_backend(t), timeout=timeout)
        return cls(t, stage, ds, _accelerator(t, ds, precision) if training else None, training)

    # -- wrapping -----------------------------------------------------------------------------

    def wrap(self, model, total_steps: int) -> None:
        """Optimizer (AdamW; DeepSpeedCPUAdam when offloaded), schedule, and DDP | ZeRO around `model`."""
        t = self.t
        if t.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        adam = None
        if self.ds is not None and t.offload != "none":
            from deepspeed.ops.adam import DeepSpeedCPUAdam as adam
        optimizer, self.scheduler = optim.build_optimizer_and_schedule(model, t, total_steps, adam)
        self.module = model
        self._external_output_layer(model)
        if t.compile:
            model = torch.compile(model)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if self.stage and t.offload == "none":
            _share_fp32_partitions(self.model.optimizer)

    def wrap_for_inference(self, model) -> None:
        """Forward-only: partitioned by DeepSpeed under ZeRO-3 (every forward collective), else a copy per
        rank."""
        self.module = model
        self._external_output_layer(model)
        if self.stage == 3:
            import deepspeed

            self.model, *_ = deepspeed.initialize(model=model, config=self.ds)
        else:
            precision = pick_precision(self.t, training=False)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
            self.model = model.to(device=self.device, dtype=dtype)
        self.model.eval()

    def _external_output_layer(self, model) -> None:
        """ZeRO-3 gathers a module's parameters around its forward: the fused loss uses the output layer
        outside it (loss.py), so the model's forward gathers it too; a sparse block with separate experts,
        whole (moe.py)."""
        from distclm.lora import base_model

        hf = base_model(model)
        if self.stage == 3:
            import deepspeed
            head = hf.get_output_embeddings() if getattr(hf, "distclm_fused_loss", False) else None
            for p in [p for p in (head.weight, head.bias) if p is not None] if head is not None else []:
                deepspeed.zero.register_external_parameter(hf, p)
            # Sparse blocks gathered whole: else an expert that no token of one rank reaches hangs the others.
            for module in z3_leaves(model, self.t.z3_leaf_modules):
                deepspeed.utils.set_z3_leaf_module(module, True)

    # -- what callers may ask ------------------------------------------------------------------

    @property
    def strategy(self) -> str:
        """--train.strategy: ddp | zero1 | zero2 | zero3 (ddp for an offline engine)."""
        return self.t.strategy if self.t is not None else "ddp"

    @property
    def ds_config(self) -> dict | None:
        """The resolved DeepSpeed config (no "auto" left), or None without DeepSpeed."""
        return self.ds

    @property
    def weights_partitioned(self) -> bool:
        """ZeRO-3: each rank holds a slice of every parameter; the full weights exist only when gathered."""
        return self.stage == 3

    @property
    def forward_is_collective(self) -> bool:
        """ZeRO-3: every forward gathers parameters from all ranks, so every rank must run as many."""
        return self.stage == 3

    # -- one optimizer step --------------------------------------------------------------------

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """One micro-batch of the accumulation: gradients are synchronised (and ZeRO steps) on the last."""
        # Set explicitly rather than counted by accelerate or DeepSpeed: their counters would come back in the
        # old accumulation units after a resume onto another world size.
        if self.ds is not None:
            self.model.set_gradient_accumulation_boundary(last)
            yield
            return
        self.accelerator.gradient_state._set_sync_gradients(last)
        with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss, scaled by 1/accumulation (under ZeRO, by DeepSpeed)."""
        if self.ds is not None:
            self.model.backward(loss)  # ZeRO reduces (scatters) the gradients at the boundary
        else:
            self.accelerator.backward(loss)

    def optimizer_step(self) -> float:
        """Clip, step, zero the gradients, step the schedule; -> the gradient norm before clipping. A
        non-finite norm skips the update on every rank alike (the norm is of the all-reduced gradients)."""
        if self.ds is not None:
            # DeepSpeed's step clips, steps and zeroes; on a non-finite norm ZeRO skips the update itself and
            # reports the norm as inf.
            self.model.step()
            norm = self.model.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        else:
            max_norm = self.t.max_grad_norm if self.t.max_grad_norm > 0 else float("inf")
            norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
            if math.isfinite(norm):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # a skipped update still consumes its step of the schedule
        return norm

    def drop_optimizer_state(self) -> None:
        """Training is over and saved: free the optimizer's moments and ZeRO's gradient partitions before the
        export."""
        opt = self.model.optimizer if self.ds is not None else self.optimizer
        getattr(opt, "optimizer", opt).state.clear()
        if getattr(opt, "grad_partitions_flat_buffer", None) is not None:
            opt.grad_partitions_flat_buffer.data = torch.empty(0)

    @property
    def lr(self) -> float:
        """The lr the next optimizer step uses."""
        return float(self.scheduler.get_last_lr()[0])

    # -- collectives ----------------------------------------------------------------------------

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        return dist.broadcast_object(obj)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """This rank's work with the engine is done (a command's `finally`): barrier, destroy_process_group, and this
        engine kept until the process ends, all under the grace, whose exit code is the one the exception in flight
        (if any) gives the command (dist.work_done, dist.release: why nothing here is ever freed)."""
        dist.work_done(exit_code.of(sys.exc_info()[1]), hold=self)

    # -- state ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def gathered(self, params) -> Iterator[None]:
        """Under ZeRO-3, `params` whole on every rank for the block (collective: every rank enters it); else
        nothing."""
        params = [p for p in params if hasattr(p, "ds_id")] if self.stage == 3 else []
        if not params:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

    def full_state_dict(self, trainable_only: bool = False,
                        merge=None) -> Iterator[tuple[str, torch.Tensor | None]]:
        """The model's state dict as (name, full CPU tensor), ONE module at a time, each tied tensor once.

        A generator rather than a dict, so that at no time is the whole model gathered: under ZeRO-3
        every rank must iterate (each module's parameters are gathered collectively, copied, released) and
        the tensors are None except on rank 0. Names are the unwrapped model's (no DDP/compile prefix).
        `merge`: (is_layer(module), tensors(prefix, module)) for layers written as one (LoRA merged into
        its base), their submodules skipped.
        """
        seen, skip = set(), None
        for prefix, module in self.module.named_modules():
            if skip is not None and prefix.startswith(skip):
                continue
            if merge is not None and merge[0](module):
                skip = prefix + "."
                with self.gathered(module.parameters()):
                    tensors = merge[1](prefix, module) if self.is_main else []
                yield from tensors if self.is_main else [(prefix, None)]
                continue
            own = [(n, t) for n, t in module._parameters.items() if t is not None and id(t) not in seen
                   and (t.requires_grad or not trainable_only)]
            own += [(n, t) for n, t in module._buffers.items() if t is not None and not trainable_only
                    and n not in module._non_persistent_buffers_set]
            seen.update(id(t) for _, t in own)  # a tied weight (GPT-2's lm_head is its wte): once, as HF does
            with self.gathered([t for _, t in own]):
                values = [(f"{prefix}.{n}" if prefix else n,
                           t.detach().cpu().clone() if self.is_main else None) for n, t in own]
            yield from values

    @property
    def has_frozen(self) -> bool:
        """Some parameters are frozen (LoRA's base): checkpoints leave them out, the model rebuilds them."""
        return any(not p.requires_grad for p in self.module.parameters())

    def save_state(self, folder: Path) -> None:
        """Everything but the weights' HF copy: ZeRO shards (every rank), or rank 0's optimizer.pt; the
        schedule."""
        if self.ds is not None:
            self.model.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False,
                                       exclude_frozen_parameters=self.has_frozen)
        elif self.is_main:
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        if self.is_main:
            schedule = json.dumps(self.scheduler.state_dict(), default=float)
            (folder / "scheduler.json").write_text(schedule + "\n")

    def load_state(self, folder: Path, universal_folder: Path | None = None) -> None:
        """Model, optimizer and schedule from a checkpoint folder (`universal_folder`: its universal copy)."""
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.scheduler.optimizer.param_groups]
        with refusing_code(folder):  # every load is weights-only (safe_load.py): a file holding code, one line
            self._load_state(folder, universal_folder)
        self.scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
        self._repair_after_load(hyper)

    def _load_state(self, folder: Path, universal_folder: Path | None) -> None:
        if self.ds is not None:
            allow_deepspeed_types()
            path, _ = self.model.load_checkpoint(str(universal_folder or folder / "deepspeed"), tag="state",
                                                 load_optimizer_states=True, load_lr_scheduler_states=False,
                                                 load_module_strict=not self.has_frozen)
            if path is None:
                raise UserError(f"cannot resume from {folder}: DeepSpeed found no loadable state under "
                                f"deepspeed/")
        else:
            self._load_plain(folder)

    def _load_plain(self, folder: Path) -> None:
        from safetensors.torch import load_file

        state = {}
        files = sorted((folder / "model").glob("*.safetensors"))
        for f in files + sorted(folder.glob("trainable.safetensors")):
            state.update(load_file(f))
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        named = dict(self.module.named_parameters(remove_duplicate=False))
        tied = set(named) - {n for n, _ in self.module.named_parameters()}
        frozen = {n for n, p in named.items() if not p.requires_grad}  # LoRA's base: rebuilt, not saved
        if unexpected or set(missing) - tied - frozen:
            lost = sorted(set(missing) - tied - frozen)[:3]
            raise UserError(f"cannot resume from {folder}: weights do not match the model "
                            f"(missing {lost}, unexpected {unexpected[:3]})")
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))

    def _repair_after_load(self, hyper: list[dict]) -> None:
        """After a (universal) load: this run's per-group hyper-parameters, the schedule's lr, own step
        counters. DeepSpeed's ZeRO-3 universal loader copies group 0's weight decay onto every group and gives
        every group the SAME Adam `step` tensor, which AdamW then increments once per group (losses drifted
        ~1e-2 in 10 steps)."""
        groups = self.scheduler.optimizer.param_groups
        assert len(hyper) == len(groups), "the optimizer's groups changed during the load"
        for group, h, lr in zip(groups, hyper, self.scheduler.get_last_lr()):
            group.update(h)
            group["lr"] = lr
        for state in self.scheduler.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def offline(module) -> Engine:
    """One process, no process group, nothing wrapped: to read a rebuilt model's state (`distclm export`)."""
    return Engine(None, None, None, None, training=False, module=module)


def full_numel(p: torch.Tensor) -> int:
    """A parameter's full element count: under ZeRO-3 its data is this rank's slice and DeepSpeed keeps the
    whole size in `ds_numel`."""
    return getattr(p, "ds_numel", p.numel())


def _share_fp32_partitions(zero) -> None:
    """ZeRO keeps an fp32 master copy of each partition even when the weights are fp32 on that device already:
    then the master IS the partition (1/world of the model saved). Stages 1-2 link each weight to its slice of
    the master (universal checkpoints read through that link), so the links are made again."""
    if stage3 := hasattr(zero, "fp32_partitioned_groups_flat"):
        pairs = zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat)
    else:
        mine = [parts[torch.distributed.get_rank(group)] for parts, group in
                zip(zero.parallel_partitioned_bit16_groups, zero.real_dp_process_group)]
        pairs = zip(zero.single_partition_of_fp32_groups, mine)
    for master, weights in pairs:
        if master is not weights and (master.dtype, master.device) == (weights.dtype, weights.device):
            master.data = weights.data
    if not stage3:
        zero._link_all_hp_params()


def _accelerator(t, ds: dict | None, precision: str):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    if ds is not None:
        # `accelerate launch` with a CPU config exports ACCELERATE_USE_CPU, which silently turns DeepSpeed
        # off.
        os.environ.pop("ACCELERATE_USE_CPU", None)
    return Accelerator(cpu=not torch.cuda.is_available() and ds is None,
                       gradient_accumulation_steps=t.grad_accum,
                       deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds) if ds is not None else None,
                       mixed_precision=precision, step_scheduler_with_optimizer=False)
