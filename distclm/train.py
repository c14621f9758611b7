"""`distclm train`: the step loop, in small named steps.

    reader + model -> engine (DDP | ZeRO via accel.py) -> for each global step:
        blocks of this rank (sampler) -> accum micro-batches forward/backward -> optimizer step
        -> log (metrics.jsonl, console) -> eval (every N steps, each epoch end) -> checkpoint

Loss reported per step: mean over all ranks and micro-batches. Every block predicts the same number
of tokens (block_size - 1), so this mean is the token-weighted mean of the global batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from distclm import dist
from distclm.config import Config, to_yaml
from distclm.console import TrainConsole
from distclm.data.blocks import BlockReader, SplitBlocks
from distclm.data.loader import BlockSampler
from distclm.errors import UserError
from distclm.metrics import MetricsFile, ThroughputMeter, flops_per_token, peak_tflops_for
from distclm.checkpoint import (check_compatible, complete_checkpoints, export_run, find_resume, load_checkpoint,
                                needs_universal, read_meta, save_checkpoint)
from distclm.model import load_model, n_params


# ---------------------------------------------------------------------------------------------
# Set-up


def default_run_dir(cfg: Config) -> str:
    model = Path(cfg.model.name.rstrip("/")).name
    return str(Path("runs") / f"{model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def agree_on_run_dir(cfg: Config, accelerator) -> Path:
    """Rank 0 names the run dir (a timestamp by default) and every rank takes its choice."""
    from accelerate.utils import broadcast_object_list

    chosen = [cfg.run.dir or default_run_dir(cfg)]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    cfg.run.dir = chosen[0]
    return Path(chosen[0])


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on GPU; resident memory of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


# ---------------------------------------------------------------------------------------------
# One step


def micro_batches(blocks: SplitBlocks, ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """(accum, micro) block ids -> token ids (accum, micro, T) on the device."""
    a, m = ids.shape
    x = blocks.batch(ids.reshape(-1)).astype(np.int64).reshape(a, m, -1)
    return torch.from_numpy(x).to(device, non_blocking=True)


def forward_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of a micro-batch (B, T): the model shifts labels inside."""
    return model(input_ids=x, labels=x, use_cache=False).loss


def train_step(engine, x: torch.Tensor, poison: bool = False) -> tuple[torch.Tensor, float]:
    """One optimizer step over (accum, micro, T) tokens -> (this rank's mean loss, grad norm).

    A non-finite gradient norm means the update was skipped (accel.Engine.optimizer_step).
    `poison` multiplies the loss by NaN: the fault-injection hook of the non-finite tests.
    """
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for micro in x:
        with engine.no_sync():  # gradients are all-reduced on the last micro-batch only
            loss = forward_loss(engine.model, micro)
            if poison:
                loss = loss * float("nan")
            engine.micro_step(loss)
        total += loss.detach().double()
    grad_norm = engine.optimizer_step()
    return total / x.size(0), grad_norm


def agree(loss_local: torch.Tensor, stop_local: bool) -> tuple[float, bool]:
    """One all-reduce per step: the mean loss over ranks, and whether any rank was asked to stop."""
    v = torch.stack([loss_local.reshape(()).double(), torch.tensor(float(stop_local), dtype=torch.float64,
                                                                    device=loss_local.device)])
    dist.all_reduce_sum(v)
    return float(v[0].item()) / dist.world_size(), bool(v[1].item() > 0)


class Preempted(Exception):
    """SIGTERM: a checkpoint was saved; exit with 143 so a restart policy retries."""


class NonFinite(Exception):
    """Too many consecutive non-finite steps: stop, keeping the last good checkpoint."""


class StopSignal:
    """Remembers a SIGTERM; the loop acts on it at the next step boundary, on all ranks together."""

    def __init__(self):
        import signal

        self.received_at: float | None = None
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()

    @property
    def requested(self) -> bool:
        return self.received_at is not None

    def restore(self) -> None:
        import signal

        signal.signal(signal.SIGTERM, self._previous)


def poisoned_steps() -> set[int]:
    """Steps whose loss is made NaN on purpose (DISTCLM_INJECT_NAN="5,6,7"): fault injection for tests."""
    import os

    raw = os.environ.get("DISTCLM_INJECT_NAN", "")
    return {int(s) for s in raw.split(",") if s.strip()}


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class Run:
    """What the loop carries: the parts, the data order and the outputs."""

    cfg: Config
    dir: Path
    engine: object
    train_blocks: SplitBlocks
    eval_blocks: SplitBlocks | None
    sampler: BlockSampler
    total_steps: int
    console: TrainConsole
    metrics: MetricsFile
    meter: ThroughputMeter
    identity: dict = field(default_factory=dict)
    start_step: int = 0
    history: list = field(default_factory=list)


def total_steps_for(cfg: Config, sampler: BlockSampler) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return cfg.train.epochs * sampler.steps_per_epoch


def build_run(cfg: Config) -> Run:
    from distclm.accel import build_engine, pick_backend

    t = cfg.train
    if not cfg.data.dir:
        raise UserError("--data.dir is required: a folder made by `distclm prepare`")
    if not cfg.model.name:
        raise UserError("--model.name is required: a hub id, a Hugging Face folder, a run dir, or gpt2-tiny")
    pick_backend(cfg)  # fail on nccl-without-GPU before any process group
    reader = open_data(cfg)
    train_blocks = reader.split("train")
    eval_blocks = reader.splits.get(cfg.eval.split)
    world = dist.world_size()
    sampler = BlockSampler(len(train_blocks), t.micro_batch_size, t.grad_accum, world, t.seed)
    if sampler.steps_per_epoch == 0:
        raise UserError(f"{cfg.data.dir}: {len(train_blocks)} train blocks are fewer than one global batch "
                        f"({t.micro_batch_size} micro x {t.grad_accum} accum x {world} processes); "
                        f"lower --train.micro_batch_size or --train.grad_accum")
    # Which checkpoint to resume from is decided first: a refusal comes before loading anything, and ZeRO
    # shards of another world size need DeepSpeed built for a universal checkpoint (load_universal).
    # With no --run.dir the run dir is a fresh timestamped one: nothing to resume there.
    identity = run_identity(cfg, reader, sampler)
    resume_from = find_resume(Path(cfg.run.dir) if cfg.run.dir else None, cfg.run.resume)
    meta = read_meta(resume_from) if resume_from is not None else None
    if meta is not None:
        check_compatible(meta, identity, t.strategy, resume_from)
    set_seed(t.seed)  # the same initial weights on every rank
    model = load_model(cfg.model.name, cfg.model.trust_remote_code)
    reader.check_model(model.config.vocab_size, model.config.n_positions, f"--model.name={cfg.model.name}")
    total = total_steps_for(cfg, sampler)
    n_pos = model.config.n_positions * model.config.n_embd
    fpt = flops_per_token(n_params(model), model.config.n_layer, model.config.n_embd, reader.block_size, n_pos)

    # The engine creates the process group; the run dir is agreed on through it.
    engine = build_engine(cfg, model, total, on_accelerator=lambda acc: _setup_run_dir(cfg, acc),
                          load_universal=meta is not None and needs_universal(meta, t.strategy, world))
    run_dir = Path(cfg.run.dir)
    peak = peak_tflops_for(device_name(engine.device), cfg.log.peak_tflops)
    console = TrainConsole(total, cfg.log.interval_s)
    metrics = MetricsFile(run_dir / "metrics.jsonl", enabled=dist.is_rank0())
    meter = ThroughputMeter(fpt, world, peak)
    run = Run(cfg, run_dir, engine, train_blocks, eval_blocks, sampler, total, console, metrics, meter,
              identity=identity)
    if resume_from is not None:
        load_checkpoint(run, resume_from)
        run.start_step = meta["step"]
        moved = f", written by {meta['world_size']} process(es), now {world}" if meta.get("world_size") != world else ""
        console.print(f"resumed from {resume_from} at step {run.start_step} "
                      f"(epoch {meta['epoch']}, step {meta['step_in_epoch']} of it{moved})")
    return run


def open_data(cfg: Config) -> BlockReader:
    """Open the prepared folder; checksums are verified the first time a run dir uses it (on every rank,
    before any process group exists, so a bad shard stops every rank alike) and remembered in RUN/."""
    reader = BlockReader(cfg.data.dir)
    marker = Path(cfg.run.dir) / "data-verified.json" if cfg.run.dir else None
    fingerprint = reader.manifest["source"].get("fingerprint")
    known = marker is not None and marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint
    if not known:
        reader = BlockReader(cfg.data.dir, verify=True)
        if marker is not None and dist.is_rank0():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"fingerprint": fingerprint, "data_dir": str(cfg.data.dir)}) + "\n")
    return reader


def run_identity(cfg: Config, reader: BlockReader, sampler: BlockSampler) -> dict:
    """What a checkpoint must share with this run to be resumed by it."""
    return {"model": cfg.model.name, "data_fingerprint": reader.manifest["source"].get("fingerprint"),
            "global_batch": sampler.global_batch, "block_size": reader.block_size, "seed": cfg.train.seed}


def checkpoint_meta(run: Run, step: int) -> dict:
    pos = run.sampler.position(step)
    return {**run.identity, "step": step, "epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch,
            "samples_consumed": step * run.sampler.global_batch,
            "world_size": dist.world_size(), "strategy": run.cfg.train.strategy}


def save(run: Run, step: int) -> Path:
    """Checkpoint `step`; out of disk space is a user error that leaves the previous checkpoint intact."""
    import errno
    import shutil

    try:
        path = save_checkpoint(run, step, checkpoint_meta(run, step))
    except (OSError, RuntimeError) as exc:
        # torch.save reports a full disk as RuntimeError("... unexpected pos ..."): look at the disk itself.
        full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
            shutil.disk_usage(run.dir).free < 16 * 2**20
        if not full:
            raise
        shutil.rmtree(run.dir / "checkpoints" / f".tmp-step-{step}", ignore_errors=True)  # give the space back
        kept = complete_checkpoints(run.dir)
        raise UserError(f"out of disk space writing checkpoint step-{step} under {run.dir / 'checkpoints'}; "
                        f"the previous checkpoint {kept[-1] if kept else '(none)'} is intact; free space or "
                        f"lower --train.keep_last, then relaunch to resume") from None
    run.console.print(f"checkpoint {path}")
    return path


def _setup_run_dir(cfg: Config, accelerator) -> Path:
    run_dir = agree_on_run_dir(cfg, accelerator)
    check_same_configuration(run_dir, cfg)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    accelerator.wait_for_everyone()
    from distclm.launch_checks import check_launch  # ranks from the env, world = nodes x nproc, run dir shared

    check_launch(run_dir)
    return run_dir


# Settings that make a run what it is: a run dir that holds other values is another run.
IDENTITY_FIELDS = ("model.name", "data.dir", "train.lr", "train.weight_decay", "train.schedule",
                   "train.warmup_steps", "train.epochs", "train.max_steps", "train.seed", "train.max_grad_norm")


def check_same_configuration(run_dir: Path, cfg: Config) -> None:
    """Refuse a run dir whose config.yaml holds another configuration, unless --run.overwrite."""
    import yaml

    path = run_dir / "config.yaml"
    if cfg.run.overwrite or not path.exists():
        return
    old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    new = cfg.to_dict()
    differ = [k for k in IDENTITY_FIELDS
              if old.get(k.split(".")[0], {}).get(k.split(".")[1]) != new[k.split(".")[0]][k.split(".")[1]]]
    if differ:
        raise UserError(f"--run.dir={run_dir} holds another configuration (differs in: "
                        f"{', '.join(f'--{k}' for k in differ)}); use another --run.dir, or --run.overwrite=true")


def log_block_ids(run: Run, step: int, ids: np.ndarray) -> None:
    if run.cfg.log.block_ids:
        with open(run.dir / f"block_ids-rank{dist.rank()}.txt", "a", encoding="utf-8") as fh:
            fh.write(f"{step} " + " ".join(map(str, ids.reshape(-1).tolist())) + "\n")


def should_log(run: Run, step: int) -> bool:
    every = run.cfg.log.every_steps
    return step == run.start_step + 1 or step == run.total_steps or (every > 0 and step % every == 0)


def run_eval(run: Run, step: int) -> dict | None:
    from distclm.evaluation import evaluate

    if run.eval_blocks is None or len(run.eval_blocks) == 0:
        return None
    result = evaluate(run.engine.model, run.eval_blocks, run.cfg.eval.batch_size, run.engine.device,
                      collective_forward=run.cfg.train.strategy == "zero3")
    record = {"type": "eval", "step": step, "epoch": step / run.sampler.steps_per_epoch,
              "eval_loss": result["loss"], "eval_perplexity": result["perplexity"], "eval_tokens": result["tokens"]}
    run.metrics.write(record)
    run.console.eval(record)
    return record


def log_step(run: Run, done: int, loss: float, lr: float, grad_norm: float, t0: float) -> dict:
    """metrics.jsonl record (every --log.every_steps) and the console line/panel of one step."""
    world, block_size = dist.world_size(), run.train_blocks.block_size
    run.meter.update(run.sampler.global_batch * block_size)
    elapsed = time.perf_counter() - t0
    tps = run.meter.tokens_per_s
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    record = {"type": "train", "step": done, "epoch": done / run.sampler.steps_per_epoch,
              "loss": loss if math.isfinite(loss) else None, "lr": lr,
              "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "tokens_per_s": tps,
              "tokens_per_s_per_device": tps / world if tps else None, "mfu": run.meter.mfu,
              "mem_bytes": memory_bytes(run.engine.device), "elapsed_s": elapsed, "time": time.time()}
    if not finite:
        record["skipped"] = True  # the update of this step was not applied
    if should_log(run, done) or not finite:
        run.metrics.write(record)
        run.history.append(record)
    eta = elapsed / (done - run.start_step) * (run.total_steps - done)
    run.console.update({**record, "loss": loss, "grad_norm": grad_norm, "eta_s": eta,
                        "samples_per_s": tps / block_size if tps else None}, force=done == run.total_steps)
    return record


def check_finite(run: Run, done: int, loss: float, grad_norm: float, streak: int) -> int:
    """Count consecutive non-finite steps (all ranks see the same all-reduced numbers); stop when too many."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return 0
    streak += 1
    t = run.cfg.train
    run.console.print(f"step {done}: non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped "
                      f"({streak} in a row, limit --train.max_nonfinite={t.max_nonfinite})")
    if t.on_nonfinite == "stop" and streak >= t.max_nonfinite:
        kept = complete_checkpoints(run.dir)
        raise NonFinite(f"stopped at step {done}: {streak} consecutive non-finite steps "
                        f"(--train.on_nonfinite=stop); last good checkpoint: "
                        f"{kept[-1] if kept else 'none'}; lower --train.lr or check the data")
    return streak


def after_step(run: Run, done: int) -> dict | None:
    """Eval at each epoch end and every --eval.every_steps; checkpoint every --train.save_every and at the end."""
    cfg, result = run.cfg, None
    epoch_end = done % run.sampler.steps_per_epoch == 0
    every = cfg.eval.every_steps
    if epoch_end or (every and done % every == 0) or done == run.total_steps:
        result = run_eval(run, done)
    if done == run.total_steps or (cfg.train.save_every and done % cfg.train.save_every == 0):
        save(run, done)
    return result


def train_loop(run: Run, stop: StopSignal) -> dict:
    engine, sampler = run.engine, run.sampler
    rank = dist.rank()
    t0 = time.perf_counter()
    engine.model.train()
    run.console.start()
    last_eval, losses, streak = None, [], 0
    poison = poisoned_steps()
    for step in range(run.start_step, run.total_steps):
        done = step + 1
        ids = sampler.rank_indices(step, rank)
        log_block_ids(run, done, ids)
        x = micro_batches(run.train_blocks, ids, engine.device)
        lr = engine.lr  # the lr this step uses (the schedule moves on inside train_step)
        loss_local, grad_norm = train_step(engine, x, poison=done in poison)
        loss, stop_all = agree(loss_local, stop.requested)
        losses.append(loss)
        log_step(run, done, loss, lr, grad_norm, t0)
        streak = check_finite(run, done, loss, grad_norm, streak)
        if stop_all and done < run.total_steps:
            run.console.close()
            save(run, done)
            waited = time.monotonic() - stop.received_at if stop.received_at else 0.0
            raise Preempted(f"SIGTERM: saved a checkpoint at step {done} ({waited:.1f}s after the signal, "
                            f"grace {run.cfg.train.preempt_grace_s:.0f}s); relaunch to resume")
        last_eval = after_step(run, done) or last_eval
    run.console.close()
    wall = time.perf_counter() - t0
    steps = run.total_steps - run.start_step
    tokens = steps * sampler.global_batch * run.train_blocks.block_size
    return {"steps": run.total_steps, "steps_this_run": steps, "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall if wall else None, "final_loss": losses[-1] if losses else None,
            "world_size": dist.world_size(),
            "eval_perplexity": last_eval["eval_perplexity"] if last_eval else None,
            "eval_loss": last_eval["eval_loss"] if last_eval else None}


def write_summary(run: Run, summary: dict) -> None:
    if not dist.is_rank0():
        return
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_curves(run.dir / "metrics.jsonl", run.dir / "curves.png")


def plot_curves(metrics_path: Path, out: Path) -> None:
    """Loss and tokens/s against step (the last record of a repeated step counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = {}, {}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        (train if r["type"] == "train" else evals)[r["step"]] = r
    steps = sorted(train)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, [train[s]["loss"] for s in steps], label="train loss")
    if evals:
        es = sorted(evals)
        ax1.plot(es, [evals[s]["eval_loss"] for s in es], "o-", label="eval loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    tps = [(s, train[s]["tokens_per_s"]) for s in steps if train[s]["tokens_per_s"]]
    if tps:
        ax2.plot(*zip(*tps))
    ax2.set_xlabel("step")
    ax2.set_ylabel("tokens/s (global)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def train(cfg: Config) -> dict:
    """Entry point: build, run, write the summary, clean up in `finally`."""
    from distclm.accel import destroy

    stop = StopSignal()  # installed first: a SIGTERM during set-up is acted on at the first step boundary
    try:
        run = build_run(cfg)
        if run.start_step >= run.total_steps:
            export_run(run.dir)
            run.console.print(f"{run.dir} is already complete at step {run.start_step}; nothing to train "
                              f"(another --run.dir, or --run.resume=none to start over)")
            summary_path = run.dir / "summary.json"
            return json.loads(summary_path.read_text()) if summary_path.exists() else {"steps": run.start_step}
        summary = train_loop(run, stop)
        export_run(run.dir)
        write_summary(run, summary)
        final = "n/a (nothing left to train)" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
        run.console.print(f"done: {summary['steps']} steps, final loss {final}, "
                          f"{summary['tokens_per_s']:.0f} tokens/s, run dir {run.dir}")
        return summary
    finally:
        stop.restore()
        destroy()

