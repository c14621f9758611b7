"""The training loop, in small named steps.

    for each optimizer step: this rank's blocks (sampler) -> accumulation of micro-batches (forward,
    backward) -> optimizer step -> one all-reduce (loss, stop flag; MoE: aux loss, and at a log step the
    interval's expert counts) -> log -> eval -> checkpoint

Loss reported per step: the mean over all ranks and micro-batches. Every block predicts the same number
of tokens (block_size - 1), so this mean is the token-weighted mean of the global batch. A masked folder
(chat / prompt_completion) has a different number of labels per block: its step loss is the sum of NLL over
the global batch's labels / their number N, exactly, on any layout (data/supervision.py says how).

Randomness (dropout) is a function of the data, not of the process: before each micro-batch the
generator is seeded from (train.seed, step, the micro-batch's position in the global batch), so one
process with accumulation and N processes draw the same masks for the same blocks, and a resume (even
onto another world size) needs no saved RNG state.
"""

from __future__ import annotations

import hashlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distclm import dist
from distclm.activity import Activity
from distclm.checkpoint import complete_checkpoints, save_checkpoint, step_of
from distclm.config import Config
from distclm.console import TrainConsole
from distclm.data.supervision import global_labels
from distclm.loss import masked_objective, objective
from distclm.metrics import MetricsFile, ThroughputMeter, memory_bytes
from distclm.plan_cli import gb, measured_peak_bytes
from distclm.rundir import RunDir
from distclm.straggler import SlowRankWatch, StepTimes, summary
from distclm.trackers import Trackers


class Preempted(Exception):
    """SIGTERM: a checkpoint was saved; exit with 143 so a restart policy retries."""

    exit_code = 143  # 128 + SIGTERM


class NonFinite(Exception):
    """Too many consecutive non-finite steps: stop, keeping the last good checkpoint."""


class StopSignal:
    """Remembers a SIGTERM; the loop acts on it at the next step boundary, on all ranks together."""

    def __init__(self):
        self.received_at: float | None = None
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()

    @property
    def requested(self) -> bool:
        return self.received_at is not None

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


@dataclass
class Loop:
    """What the loop carries: the plan, the engine, where outputs go, and how they are shown."""

    cfg: Config
    plan: object  # train.Plan
    engine: object  # engine.Engine
    run: RunDir
    hf: tuple  # (tokenizer, gen settings) for the Hugging Face folders of checkpoints
    console: TrainConsole
    metrics: MetricsFile
    trackers: Trackers
    meter: ThroughputMeter
    watch: SlowRankWatch | None = None  # rank 0: names slow ranks (straggler.py)
    routers: object = None  # moe.RouterStats of a mixture-of-experts model, else None
    times: StepTimes = field(default_factory=StepTimes)
    activity: Activity = field(default_factory=Activity)  # this rank's phase and waits, for step parts and heartbeat
    start_step: int = 0
    losses: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# One step


def micro_seed(seed: int, step: int, position: int) -> int:
    """The generator seed of micro-batch `position` (in the global batch) of optimizer step `step`."""
    digest = hashlib.blake2b(f"distclm:{seed}:{step}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def micro_batches(blocks, ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """(accum, micro) block ids -> token ids (accum, micro, T) on the device."""
    a, m = ids.shape
    x = blocks.batch(ids.reshape(-1)).astype(np.int64).reshape(a, m, -1)
    return torch.from_numpy(x).to(device, non_blocking=True)


def micro_flags(blocks, ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """(accum, micro) block ids -> their LOSS/START flags (accum, micro, T) uint8 on the device."""
    a, m = ids.shape
    return torch.from_numpy(blocks.flags(ids.reshape(-1)).reshape(a, m, -1)).to(device, non_blocking=True)


def forward_loss(model, x: torch.Tensor, eos: int | None, routers=None, flags: torch.Tensor | None = None,
                 scale: float = 1.0) -> torch.Tensor:
    """The loss to backpropagate of a micro-batch (B, T): the model's objective (its mean next-token loss, `eos`:
    attention within documents; loss.py), or with `flags` its labels' NLL sum x `scale` (accum x world / N) plus
    what the model adds itself (a router's balancing loss, weighed per micro-batch as in the mean case).
    `routers` (moe.RouterStats) takes note of the model's aux loss and routing."""
    out = objective(model, x, eos) if flags is None else masked_objective(model, x, flags)
    if routers is not None:
        routers.add(out)
    return out.loss if flags is None else out.nll_sum * scale + out.extra


def train_step(engine, x: torch.Tensor, step: int, seed: int, act: Activity, eos: int | None = None,
               routers=None, flags: torch.Tensor | None = None, labels: int | None = None) -> tuple[torch.Tensor, float]:
    """Optimizer step `step` (1-based) over this rank's (accum, micro, T) tokens -> (mean loss, grad norm).
    `flags` (accum, micro, T) and `labels` (N of the global batch): a masked folder's exact loss.

    A non-finite gradient norm means the update was skipped (Engine.optimizer_step). `act` says which phase runs
    (the heartbeat) and collects the step's wall times and waits per part (act.times).
    """
    clock, times = act.clock, act.times
    t0 = clock.mark()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    accum = x.size(0)
    # The engine divides each backward by accum and DDP/ZeRO average over the world: x accum x world / N leaves
    # the global sum / N. The returned mean of these over accum, averaged over ranks by agree(), is that loss too.
    scale = accum * engine.world / max(1, labels) if flags is not None else 1.0
    for k, micro in enumerate(x):
        torch.manual_seed(micro_seed(seed, step, k * engine.world + engine.rank))  # [accum][world] layout
        with engine.micro_batch(last=k == accum - 1):
            with act.phase("forward", "compute"):
                loss = forward_loss(engine.model, micro, eos, routers, None if flags is None else flags[k], scale)
            with act.phase("backward", "compute"):
                engine.backward(loss)
        total += loss.detach().double()
    t1 = clock.mark()
    with act.phase("optimizer", "optimizer"):
        grad_norm = engine.optimizer_step()
    times.span("compute", t0, t1)
    times.span("optimizer", t1, clock.mark())
    return total / accum, grad_norm


def agree(loss_local: torch.Tensor, stop_local: bool,
          extra: torch.Tensor | None = None) -> tuple[float, bool, torch.Tensor | None]:
    """One all-reduce per step: the mean loss over ranks, whether any rank was asked to stop, and `extra`
    (float64, the same length on every rank) summed over ranks."""
    v = torch.cat([loss_local.reshape(1).double(),
                   torch.tensor([float(stop_local)], dtype=torch.float64, device=loss_local.device)] +
                  ([extra.to(loss_local.device)] if extra is not None else []))
    dist.all_reduce_sum(v)
    return float(v[0].item()) / dist.world_size(), bool(v[1].item() > 0), v[2:] if extra is not None else None


# ---------------------------------------------------------------------------------------------
# Around a step


def log_block_ids(loop: Loop, step: int, ids: np.ndarray) -> None:
    if loop.cfg.log.block_ids:
        with open(loop.run.block_ids(dist.rank()), "a", encoding="utf-8") as fh:
            fh.write(f"{step} " + " ".join(map(str, ids.reshape(-1).tolist())) + "\n")


def emit(loop: Loop, record: dict) -> None:
    """A record to metrics.jsonl and to the experiment trackers (rank 0)."""
    loop.metrics.write(record)
    loop.trackers.log(record)


def should_log(loop: Loop, step: int) -> bool:
    every = loop.cfg.log.every_steps
    return step == loop.start_step + 1 or step == loop.plan.total_steps or (every > 0 and step % every == 0)


def log_step(loop: Loop, done: int, loss: float, lr: float, grad_norm: float, t0: float, moe: dict) -> dict:
    """metrics.jsonl record (every --log.every_steps) and the console line/panel of one step."""
    sampler, world = loop.plan.sampler, dist.world_size()
    loop.meter.update(sampler.global_batch * loop.plan.block_size)
    elapsed, tps = time.perf_counter() - t0, loop.meter.tokens_per_s
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    record = {"type": "train", "step": done, "epoch": done / sampler.steps_per_epoch,
              "loss": loss if math.isfinite(loss) else None, "lr": lr,
              "grad_norm": grad_norm if math.isfinite(grad_norm) else None, "tokens_per_s": tps,
              "tokens_per_s_per_device": tps / world if tps else None, "mfu": loop.meter.mfu,
              "mem_bytes": memory_bytes(loop.engine.device), "elapsed_s": elapsed, "time": time.time(), **moe}
    if not finite:
        record["skipped"] = True  # the update of this step was not applied
    if should_log(loop, done):
        record["step_parts"] = rank_times(loop)
    if should_log(loop, done) or not finite:
        emit(loop, record)
    if done == min(loop.start_step + 2, loop.plan.total_steps) and loop.plan.predicted_bytes:
        # Two steps in, the optimizer's states exist: the plan against this rank's peak so far (no collective).
        peak = measured_peak_bytes(loop.engine.device)
        loop.console.print(f"memory after step {done}: peak {gb(peak)} on rank 0, planned "
                           f"{gb(loop.plan.predicted_bytes)} per rank ({peak / loop.plan.predicted_bytes:.2f}x)")
    eta = elapsed / (done - loop.start_step) * (loop.plan.total_steps - done)
    loop.console.update({**record, "loss": loss, "grad_norm": grad_norm, "eta_s": eta,
                         "samples_per_s": tps / loop.plan.block_size if tps else None},
                        force=done == loop.plan.total_steps)
    return record


def rank_times(loop: Loop) -> dict:
    """The interval's seconds per step of each part on every rank (one small all-gather, every rank calls it):
    -> its max and median per part for metrics.jsonl; rank 0 names a rank that stays slow."""
    per_rank = dist.all_gather_object(loop.times.take())
    if loop.watch is not None:
        for line in loop.watch.update(per_rank):
            loop.console.print(line)
    return summary(per_rank)


def check_finite(loop: Loop, done: int, loss: float, grad_norm: float, streak: int) -> int:
    """Count consecutive non-finite steps (all ranks see the same all-reduced numbers); stop when too many."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return 0
    streak += 1
    t = loop.cfg.train
    loop.console.print(f"step {done}: non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped "
                       f"({streak} in a row, limit --train.max_nonfinite={t.max_nonfinite})")
    if t.on_nonfinite == "stop" and streak >= t.max_nonfinite:
        kept = complete_checkpoints(loop.run.path)
        raise NonFinite(f"stopped at step {done}: {streak} consecutive non-finite steps "
                        f"(--train.on_nonfinite=stop); last good checkpoint: "
                        f"{kept[-1] if kept else 'none'}; lower --train.lr or check the data")
    return streak


def run_eval(loop: Loop, step: int) -> dict | None:
    from distclm.evaluation import evaluate_splits

    splits = [s for s in loop.plan.eval_splits if len(s[1])]
    if not splits:
        return None
    e = loop.engine
    # A ZeRO-3 forward is collective (every rank runs as many); any other is local: the bare module, no DDP hooks.
    model = e.model if e.forward_is_collective else e.module
    with loop.activity.phase("eval"):
        result = evaluate_splits(model, splits, loop.cfg.eval.batch_size, e.device, e.forward_is_collective,
                                 loop.plan.eos)
    record = {"type": "eval", "step": step, "epoch": step / loop.plan.sampler.steps_per_epoch,
              "eval_loss": result["loss"], "eval_perplexity": result["perplexity"], "eval_tokens": result["tokens"],
              "eval_blocks": result["blocks"]}
    if loop.routers is not None:  # a MoE model's training loss also holds its routers' aux loss; eval's does not
        record["eval_loss_excludes"] = "aux_loss"
    if "by_dir" in result:  # a mixture: each folder's, the weighted one above
        record["eval_by_dir"] = result["by_dir"]
    emit(loop, record)
    loop.console.eval(record)
    return record


def save(loop: Loop, step: int) -> Path:
    with loop.activity.phase("checkpoint"):
        path = save_checkpoint(loop.engine, loop.run.path, loop.plan.checkpoint_meta(step),
                               loop.cfg.train.keep_last, loop.hf)
    loop.trackers.checkpointed(step_of(complete_checkpoints(loop.run.path)[0]))  # the oldest a resume can use
    loop.console.print(f"checkpoint {path}")
    return path


def after_step(loop: Loop, done: int) -> dict | None:
    """Eval at each epoch end, every --eval.every_steps and (--eval.at_end) after the last step; checkpoint every
    --train.save_every and at the end."""
    cfg, result, total = loop.cfg, None, loop.plan.total_steps
    every = cfg.eval.every_steps
    if done % loop.plan.sampler.steps_per_epoch == 0 or (every and done % every == 0) or \
            (done == total and cfg.eval.at_end):
        result = run_eval(loop, done)
    if done == total or (cfg.train.save_every and done % cfg.train.save_every == 0):
        save(loop, done)
    return result


def preempt(loop: Loop, done: int, stop: StopSignal) -> None:
    loop.console.close()
    save(loop, done)
    waited = time.monotonic() - stop.received_at if stop.received_at else 0.0
    raise Preempted(f"SIGTERM: saved a checkpoint at step {done} ({waited:.1f}s after the signal, "
                    f"grace {loop.cfg.train.preempt_grace_s:.0f}s); relaunch to resume")


def run_loop(loop: Loop, stop: StopSignal) -> dict:
    """Steps start_step+1 .. total_steps; -> the summary of this launch."""
    engine, plan, seed, act = loop.engine, loop.plan, loop.cfg.train.seed, loop.activity
    t0, last_eval, streak = time.perf_counter(), None, 0
    engine.model.train()
    loop.console.start()
    for done in range(loop.start_step + 1, plan.total_steps + 1):
        ids = plan.sampler.rank_indices(done - 1, engine.rank)
        log_block_ids(loop, done, ids)
        act.step = done
        t = act.clock.mark()
        with act.phase("data", "data"):
            x = micro_batches(plan.train_blocks, ids, engine.device)
            flags = micro_flags(plan.train_blocks, ids, engine.device) if plan.masked else None
            labels = global_labels(plan.train_blocks, plan.sampler, done - 1) if plan.masked else None
        loop.times.span("data", t, act.clock.mark())
        lr = engine.lr  # the lr this step uses (the schedule moves on inside train_step)
        loss_local, grad_norm = train_step(engine, x, done, seed, act, plan.eos, loop.routers, flags, labels)
        t = act.clock.mark()
        routers = loop.routers
        extra = routers.payload(should_log(loop, done), engine.device) if routers is not None else None
        with act.phase("loss all-reduce", "comm"):
            loss, stop_all, extra = agree(loss_local, stop.requested, extra)
        loop.times.span("comm", t, act.clock.mark())
        loop.times.step_done()
        loop.losses.append(loss)
        with act.phase("log"):
            log_step(loop, done, loss, lr, grad_norm, t0, routers.figures(extra, engine.world) if routers else {})
        streak = check_finite(loop, done, loss, grad_norm, streak)
        if stop_all and done < plan.total_steps:
            preempt(loop, done, stop)
        last_eval = after_step(loop, done) or last_eval
    loop.console.close()
    wall = time.perf_counter() - t0
    steps = plan.total_steps - loop.start_step
    tokens = steps * plan.sampler.global_batch * plan.block_size
    return {"steps": plan.total_steps, "steps_this_run": steps, "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall if wall else None, "final_loss": loop.losses[-1] if loop.losses else None,
            "world_size": dist.world_size(),
            "eval_perplexity": last_eval["eval_perplexity"] if last_eval else None,
            "eval_loss": last_eval["eval_loss"] if last_eval else None}
