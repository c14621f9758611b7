"""The ONE module that imports accelerate and deepspeed: process group, DDP or ZeRO, the step mechanics.

Strategy comes from `--train.strategy` (accelerate config files carry topology only). DeepSpeed is
fed a config from ds_configs/ whose every "auto" distclm fills from its own config; the resolved
JSON is written to RUN/ds_config.json. The optimizer is always ours (AdamW, no decay on biases and
LayerNorm), or DeepSpeedCPUAdam in AdamW mode when the optimizer is offloaded; the LR schedule is a
LambdaLR that we step once per optimizer step (`step_scheduler_with_optimizer=False`: otherwise
accelerate steps it once per process and the lr depends on the world size).
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from distclm.config import Config
from distclm.errors import UserError

DS_CONFIG_DIR = Path(os.environ.get("DISTCLM_DS_CONFIGS", Path(__file__).resolve().parent.parent / "ds_configs"))
STAGES = {"ddp": None, "zero1": 1, "zero2": 2, "zero3": 3}


def zero_stage(cfg: Config) -> int | None:
    return STAGES[cfg.train.strategy]


def pick_backend(cfg: Config) -> str:
    backend = cfg.train.backend
    if backend == "nccl" and not torch.cuda.is_available():
        raise UserError("--train.backend=nccl needs CUDA GPUs and none is visible here; use --train.backend=gloo "
                        "(or auto) on CPU")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def pick_precision(cfg: Config) -> str:
    """'no' | 'bf16' | 'fp16' in accelerate's words."""
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if p in ("bf16", "fp16") and not torch.cuda.is_available():
        raise UserError(f"--train.precision={p} needs a GPU here; use fp32 (or auto) on CPU")
    return {"fp32": "no"}.get(p, p)


def _template_name(stage: int, offload: str) -> str:
    if offload == "all":
        return "zero3_offload_all.json"
    if offload == "optimizer":
        return "zero3_offload.json" if stage == 3 else "zero2_offload.json"
    return f"zero{stage}.json"


def resolve_ds_config(cfg: Config, world: int, hidden_size: int) -> dict:
    """The DeepSpeed config with no "auto" left: template < user JSON < distclm's values, then checked."""
    t = cfg.train
    stage = zero_stage(cfg)
    if t.offload == "all" and stage != 3:
        raise UserError(f"--train.offload=all offloads parameters, which needs --train.strategy=zero3 "
                        f"(got {t.strategy}); use --train.offload=optimizer with {t.strategy}")
    path = DS_CONFIG_DIR / _template_name(stage, t.offload)
    if not path.is_file():
        raise UserError(f"DeepSpeed template {path} not found; set DISTCLM_DS_CONFIGS to the repo's ds_configs/")
    ds = json.loads(path.read_text())
    if t.deepspeed_config:
        try:
            user = json.loads(Path(t.deepspeed_config).read_text())
        except FileNotFoundError:
            raise UserError(f"--train.deepspeed_config={t.deepspeed_config}: no such file") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"--train.deepspeed_config={t.deepspeed_config}: not valid JSON ({exc})") from None
        _check_user_ds(user, cfg, world, t.deepspeed_config)
        ds = _merge(ds, user)
    precision = pick_precision(cfg)
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # our torch AdamW
        "zero_force_ds_cpu_optimizer": False,   # we build DeepSpeedCPUAdam ourselves when offloading
        "zero_optimization": {"stage": stage},
    }
    ds = _merge(ds, ours)
    zo = ds["zero_optimization"]
    zo.setdefault("offload_optimizer", {"device": "none"})
    if t.offload == "none":
        zo["offload_optimizer"] = {"device": "none"}
        zo.pop("offload_param", None)
    for key, value in {"reduce_bucket_size": hidden_size * hidden_size,
                       "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                       "stage3_param_persistence_threshold": 10 * hidden_size}.items():
        if zo.get(key) == "auto":
            zo[key] = value
    left = _autos(ds)
    if left:
        raise UserError(f"DeepSpeed config still has \"auto\" for {', '.join(left)} after distclm filled its own "
                        f"values; set them in --train.deepspeed_config")
    return ds


def _check_user_ds(user: dict, cfg: Config, world: int, path: str) -> None:
    """A user DeepSpeed JSON may add settings, not contradict distclm's batch/clipping flags."""
    t = cfg.train
    expect = {
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "--train.micro_batch_size"),
        "gradient_accumulation_steps": (t.grad_accum, "--train.grad_accum"),
        "train_batch_size": (t.micro_batch_size * t.grad_accum * world,
                             f"--train.micro_batch_size x --train.grad_accum x world size {world}"),
        "gradient_clipping": (t.max_grad_norm, "--train.max_grad_norm"),
    }
    for key, (value, flag) in expect.items():
        got = user.get(key, "auto")
        if got != "auto" and got != value:
            raise UserError(f"--train.deepspeed_config={path}: {key}={got} contradicts {flag} = {value}; "
                            f"remove it from the JSON (or set it to \"auto\") or change the flag")
    stage = user.get("zero_optimization", {}).get("stage", "auto")
    if stage not in ("auto", zero_stage(cfg)):
        raise UserError(f"--train.deepspeed_config={path}: zero_optimization.stage={stage} contradicts "
                        f"--train.strategy={t.strategy}; the strategy flag decides the stage")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _autos(tree: dict, prefix: str = "") -> list[str]:
    found = []
    for key, value in tree.items():
        if isinstance(value, dict):
            found += _autos(value, f"{prefix}{key}.")
        elif value == "auto":
            found.append(prefix + key)
    return found


def free_port() -> int:
    """A TCP port nobody listens on now (for a 1-node rendezvous on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launch_env() -> None:
    """One process started without a launcher: the env a 1-process group needs (DeepSpeed always makes one)."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases and LayerNorm weights (all 1-D tensors)."""
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then linear/cosine/constant."""
    def f(step: int) -> float:
        if step < warmup:
            return step / warmup  # as transformers' get_*_schedule_with_warmup: 0 at step 0
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)
    return f


@dataclass
class Engine:
    """The prepared model, optimizer and scheduler, and how one optimizer step is taken."""

    accelerator: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    deepspeed: bool
    max_grad_norm: float

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def micro_step(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (DDP syncs gradients on the last of the accumulation)."""
        self.accelerator.backward(loss)

    def no_sync(self):
        return self.accelerator.accumulate(self.model)

    def optimizer_step(self) -> float:
        """Clip, step, zero grads, step the schedule; returns the gradient norm before clipping."""
        if self.deepspeed:
            # accelerator.backward already ran engine.step() (clip + step + zero_grad) on the last micro-batch;
            # on a non-finite gradient norm ZeRO skips the update itself and reports the norm as inf.
            norm = self.model.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        else:
            max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
            norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
            # The norm is of the all-reduced gradients: every rank sees the same value and skips alike.
            if math.isfinite(norm):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # a skipped update still consumes its step of the schedule
        return norm

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def unwrap(self) -> torch.nn.Module:
        """The plain model: without DDP/DeepSpeed wrappers and without torch.compile's OptimizedModule."""
        model = self.accelerator.unwrap_model(self.model)
        return getattr(model, "_orig_mod", model)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()


def init_group_for_this_attempt(backend: str, timeout: timedelta) -> None:
    """Under torchrun, form the process group on a store prefixed by the restart count.

    torchrun's agent keeps ONE TCPStore across restart rounds and its workers use it unprefixed, so
    after `--max-restarts` brings the ranks back, gloo can read a dead round's addresses and fail with
    "connectFullMesh ... Connection refused" (seen here in 1 of 4 restarts). Accelerate and DeepSpeed
    then find the group formed and use it.
    """
    import torch.distributed as td

    if td.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    store = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                        timeout=timeout)
    store = td.PrefixStore(f"distclm/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    td.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


def build_accelerator(cfg: Config, ds_config: dict | None):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    from distclm.launch_checks import explain_init_errors

    backend = pick_backend(cfg)
    if ds_config is not None:
        ensure_launch_env()
        # `accelerate launch` with a CPU config exports ACCELERATE_USE_CPU, which silently turns DeepSpeed off.
        os.environ.pop("ACCELERATE_USE_CPU", None)
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config) if ds_config is not None else None
    # One plain process has no process group: a backend given to accelerate then breaks its set-up.
    grouped = ds_config is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Without cpu=True accelerate leaves several CPU processes un-wrapped (no DDP, gradients never
    # all-reduced, ranks silently diverge); with it, DeepSpeed is silently off. So: cpu=True for DDP only.
    timeout = timedelta(seconds=cfg.train.dist_timeout_s)
    with explain_init_errors(cfg.train.dist_timeout_s):  # unreachable rendezvous/backend: one line, not a hang
        if grouped:
            init_group_for_this_attempt(backend, timeout)
        return Accelerator(
            cpu=not torch.cuda.is_available() and ds_config is None,
            deepspeed_plugin=plugin,
            gradient_accumulation_steps=cfg.train.grad_accum,
            mixed_precision=pick_precision(cfg),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[InitProcessGroupKwargs(backend=backend, timeout=timeout)] if grouped else [],
        )


def build_engine(cfg: Config, model: torch.nn.Module, total_steps: int, on_accelerator=None,
                 load_universal: bool = False) -> Engine:
    """Wrap the model for the strategy; write RUN/ds_config.json when DeepSpeed is used.

    `on_accelerator(accelerator) -> run dir or None` runs once the process group exists (to agree on the run dir).
    `load_universal`: the ZeRO state to resume from is a DeepSpeed universal checkpoint (another world size);
    DeepSpeed reads that switch from the config it is built with, so it must be known here.
    """
    t = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    stage = zero_stage(cfg)
    ds_config = None
    if stage is not None:
        ds_config = resolve_ds_config(cfg, world, model.config.n_embd)
        if load_universal:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    elif t.offload != "none":
        raise UserError(f"--train.offload={t.offload} needs a ZeRO strategy (--train.strategy=zero2 or zero3)")
    accelerator = build_accelerator(cfg, ds_config)
    uses_ds = str(accelerator.distributed_type).endswith("DEEPSPEED")
    if (ds_config is not None) != uses_ds:
        raise UserError(f"--train.strategy={t.strategy} asked for {'DeepSpeed' if ds_config else 'DDP'} but accelerate "
                        f"set up {accelerator.distributed_type}; the launcher's accelerate config must carry topology "
                        f"only (no deepspeed_config / distributed_type DEEPSPEED)")
    run_dir = on_accelerator(accelerator) if on_accelerator else None
    if ds_config is not None and run_dir is not None and accelerator.is_main_process:
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    if t.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    groups = param_groups(model, t.weight_decay)
    if ds_config is not None and t.offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, adamw_mode=True)
    else:
        # fused: one kernel per parameter group instead of a loop over tensors (CPU and CUDA).
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.schedule, t.warmup_steps, total_steps))
    if t.compile:
        model = torch.compile(model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return Engine(accelerator, model, optimizer, scheduler, ds_config is not None, t.max_grad_norm)


def to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed ZeRO shards (one tag folder) -> a universal checkpoint any world size can load.

    DeepSpeed's `ds_to_universal` (the same as `python -m deepspeed.checkpoint.ds_to_universal
    --input_folder SRC --output_folder DST --inject_missing_state`), run in this process with one worker:
    its worker pool would fork a process that holds a process group, and a child process pays
    DeepSpeed's import again (~5 s). `inject_missing_state` adds what stage 1/2 checkpoints lack.
    """
    import contextlib
    import io
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
    except Exception as exc:
        raise RuntimeError(f"DeepSpeed's ds_to_universal failed on {src}: {exc}\n{log.getvalue()[-4000:]}") from exc


def destroy() -> None:
    """barrier + destroy_process_group before exit: avoids a rare abort at interpreter shutdown."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        try:
            td.barrier()
        finally:
            td.destroy_process_group()


def prepare_for_inference(cfg: Config, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.device]:
    """The model ready for forward-only work (eval) on this rank, and its device.

    --train.strategy=zero3 partitions the parameters across ranks through DeepSpeed (no optimizer):
    every forward is then collective. Any other strategy keeps a full copy on each rank. Creates the
    process group when several processes were launched (and always for DeepSpeed); `destroy()` ends it.
    Numbers are fp32 unless --train.precision names bf16/fp16 ("auto" means fp32 here: a perplexity
    should not depend on the strategy or the card).
    """
    import torch.distributed as td

    backend = pick_backend(cfg)
    precision = "no" if cfg.train.precision == "auto" else pick_precision(cfg)
    stage = zero_stage(cfg)
    if stage == 3:
        ensure_launch_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world > 1 or stage == 3) and not td.is_initialized():
        td.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    if stage != 3:
        return model.to(device=device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)), device
    import deepspeed

    ds = resolve_ds_config(cfg, world, model.config.n_embd)
    ds["bf16"], ds["fp16"] = {"enabled": precision == "bf16"}, {"enabled": precision == "fp16"}
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    return engine, device
