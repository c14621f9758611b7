"""`distclm train`: six phases, in order, each one function here.

    1. plan      pure, before any process group: check the flags, open the data, read the model's shape,
                 build the sampler, choose the checkpoint to resume and check it fits this run
    2. engine    form the process group and register DeepSpeed's config; build the model (partitioned
                 under ZeRO-3) and wrap it with its optimizer for the strategy
    3. run dir   agree on it, refuse one of another configuration, write config.yaml, launch checks
    4. resume    model, optimizer and schedule from the chosen checkpoint
    5. loop      steps, logs, evals, checkpoints (loop.py)
    6. finish    export, summary.json, curves.png

    torchrun --nproc_per_node 2 -m distclm.cli train --data.dir=data/pydoc --model.name=gpt2-tiny --train.strategy=zero2
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from distclm import dist, exit_code, hub_push
from distclm.activity import Activity, attach_ddp, clock_for, instrumented
from distclm.atomic import check_writable
from distclm.checkpoint import check_compatible, find_resume, load_checkpoint, needs_universal, read_meta
from distclm.config import Config
from distclm.console import TrainConsole
from distclm.data import mixture, supervision
from distclm.data.loader import BlockSampler, MixedBlocks, MixtureSampler
from distclm.errors import UserError
from distclm.export import export_run
from distclm.loop import Loop, NonFinite, Preempted, StopSignal, run_loop
from distclm.lora import apply_lora
from distclm.loss import install
from distclm.metrics import MetricsFile, ThroughputMeter, device_name, flops_per_token, peak_tflops_for
from distclm.model import (
    ModelShape,
    build_model,
    carried_tokenizer,
    load_config,
    load_model_tokenizer,
    matmul_parameters,
    parameter_counts,
)
from distclm.moe import RouterStats, inactive_parameters, sparse_blocks, top_k
from distclm.plan_cli import gb, lower_after_oom, memory_summary, predicted_for_run, resolve_auto_micro
from distclm.rundir import RunDir, check_run_dir, claim_run_dir, open_data
from distclm.straggler import SlowRankWatch
from distclm.trackers import Trackers, parse_names
from distclm.watchdog import start_watchdog


@dataclass(frozen=True)
class Plan:
    """Everything decided before any process group: a refusal here costs nothing."""

    cfg: Config
    shape: ModelShape
    train_blocks: object  # SplitBlocks, or MixedBlocks for a mixture of folders
    eval_splits: list  # [(folder, SplitBlocks, weight)]: each folder's eval split (first --eval.max_blocks)
    weights: list  # the mixture's weights (one "1" for a single folder)
    sampler: object  # BlockSampler, or MixtureSampler
    total_steps: int
    identity: dict  # what a checkpoint must share with this run to be resumed by it
    data_fingerprints: list  # of the prepared folders, verified
    resume_from: Path | None
    meta: dict | None  # the checkpoint's training state
    eos_token_id: int = 0
    masked: bool = False  # chat / prompt_completion data: loss on labels only, attention within samples
    chat_template: str | None = None  # the data's, carried into the export
    predicted_bytes: int | None = None  # the plan's per-rank peak for this run (plan_cli.py), summary.json
    tokenizer_from: str | None = None  # the data's saved tokenizer, carried into checkpoints and the export

    @property
    def block_size(self) -> int:
        return self.train_blocks.block_size

    @property
    def eos(self) -> int | None:
        """The EOS id when attention stays within documents (--train.doc_attention=within), else None."""
        return self.eos_token_id if self.cfg.train.doc_attention == "within" else None

    @property
    def universal(self) -> bool:
        """ZeRO shards of another world size: DeepSpeed must be built to load a universal checkpoint."""
        return self.meta is not None and needs_universal(self.meta, self.cfg.train.strategy, dist.world_size())

    def checkpoint_meta(self, step: int) -> dict:
        pos = self.sampler.position(step)
        return {**self.identity, "step": step, "epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch,
                "samples_consumed": step * self.sampler.global_batch, "world_size": dist.world_size(),
                "strategy": self.cfg.train.strategy}


def for_world(cfg: Config, world: int) -> Config:
    """--train.global_batch_size resolved for this world size (grad_accum = global / (micro x world)); the config
    as it is otherwise. A world size that does not divide the global batch is refused, naming the ones that do."""
    t = cfg.train
    if t.global_batch_size is None:
        return cfg
    g, m = t.global_batch_size, t.micro_batch_size
    if g % (m * world):
        fits = ", ".join(str(w) for w in range(1, g // m + 1) if g % (m * w) == 0) or "none (not a multiple of it)"
        raise UserError(f"--train.global_batch_size={g} is not a multiple of --train.micro_batch_size={m} x {world} "
                        f"process(es); world sizes that divide it: {fits}")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=g // (m * world)))


def data_and_sampler(cfg: Config, shape: ModelShape):
    """The prepared folder(s), checked against the model and each other -> (readers, weights, train, sampler)."""
    t, world = cfg.train, dist.world_size()
    readers, ws = open_data(cfg, shape)
    splits = [r.split("train") for r in readers]
    if len(readers) == 1:
        train_blocks = splits[0]
        sampler = BlockSampler(len(train_blocks), t.micro_batch_size, t.grad_accum, world, t.seed)
    else:
        train_blocks = MixedBlocks(splits)
        sampler = MixtureSampler([len(s) for s in splits], ws, t.micro_batch_size, t.grad_accum, world, t.seed)
    if sampler.steps_per_epoch == 0:
        raise UserError(f"{cfg.data.dir}: {len(train_blocks)} train blocks are fewer than one global batch "
                        f"({t.micro_batch_size} micro x {t.grad_accum} accum x {world} processes); "
                        f"lower --train.micro_batch_size or --train.grad_accum")
    return readers, ws, train_blocks, sampler


def make_plan(cfg: Config) -> Plan:
    t = cfg.train
    if not cfg.model.name:
        raise UserError("--model.name is required: a hub id, a Hugging Face folder, a run dir, or a preset "
                        "(gpt2-tiny, llama-tiny, ...)")
    parse_names(cfg.log.trackers)  # a tracker that is not installed: one line, before anything starts
    check_writable(cfg.run.dir or "runs", "--run.dir")  # (the default is a fresh folder under runs/)
    check_run_dir(cfg)  # a folder of the user's, a dataset or an export as --run.dir: one line, nothing written
    shape = ModelShape.of(load_config(cfg.model.name, cfg.model.trust_remote_code))
    readers, ws, train_blocks, sampler = data_and_sampler(cfg, shape)
    if supervision.masked(readers):  # before any process group: a refused folder costs nothing
        supervision.check_folders(cfg, readers, supervision.model_template(cfg))
    identity = {"model": cfg.model.name, "data_fingerprint": mixture.fingerprint(readers, ws),
                "global_batch": sampler.global_batch, "block_size": readers[0].block_size, "seed": t.seed,
                "lora": dataclasses.asdict(cfg.lora) if cfg.lora.r else None}
    # With no --run.dir the run dir is a fresh timestamped one: nothing to resume there.
    resume_from = find_resume(Path(cfg.run.dir) if cfg.run.dir else None, cfg.run.resume)
    meta = read_meta(resume_from) if resume_from is not None else None
    if meta is not None:
        check_compatible(meta, identity, t.strategy, resume_from)
    total = t.max_steps if t.max_steps is not None else t.epochs * sampler.steps_per_epoch
    evals = [(str(r.folder), r.splits[cfg.eval.split].first(cfg.eval.max_blocks), w) for r, w in zip(readers, ws)
             if cfg.eval.split in r.splits]
    return Plan(cfg, shape, train_blocks, evals, ws, sampler, total, identity,
                [r.manifest["source"].get("fingerprint") for r in readers], resume_from, meta, readers[0].eos_token_id,
                supervision.masked(readers), supervision.folder_template(readers),
                predicted_for_run(cfg, dist.world_size(), readers[0].block_size),
                tokenizer_from=carried_tokenizer(cfg.model.name, readers[0]))


def build_engine(cfg: Config, plan: Plan, activity: Activity | None = None):
    """The process group and DeepSpeed config first, so that ZeRO-3 builds the model partitioned. `activity`
    times the collectives (already instrumented) and, under DDP, the gradient all-reduce (a comm hook); None:
    set-up alone (tests/support/probe_setup.py)."""
    from distclm.engine import Engine

    activity = activity if activity is not None else Activity()

    engine = Engine.start(cfg.train, plan.shape.hidden_size, universal=plan.universal)
    model = apply_lora(build_model(cfg.model.name, cfg.train.seed, cfg.model.trust_remote_code), cfg.lora,
                       cfg.train.seed)
    engine.loss = install(model, cfg.train.fused_loss)
    engine.wrap(model, plan.total_steps)
    attach_ddp(activity, engine.model)
    activity.clock = clock_for(engine.device)
    return engine


def build_loop(cfg: Config, plan: Plan, engine, run: RunDir, activity: Activity) -> Loop:
    module, shape = engine.module, plan.shape
    k = top_k(module.config)
    inactive = inactive_parameters(module, k)
    # FLOPs per token from the model's own shape and its ACTIVE parameters (the formulas: metrics.py, moe.py)
    fpt = flops_per_token(matmul_parameters(module) - inactive, shape.num_layers, shape.num_heads * shape.head_dim,
                          plan.block_size)
    peak = peak_tflops_for(device_name(engine.device), cfg.log.peak_tflops)
    tokenizer = load_model_tokenizer(cfg.model.name, cfg.data.tokenizer, plan.tokenizer_from)
    if plan.chat_template is not None:  # checkpoints and the export speak the template the model was trained on
        tokenizer.chat_template = plan.chat_template
    hf = (tokenizer, cfg.gen)
    trackers = Trackers(engine, parse_names(cfg.log.trackers), run.path, cfg.to_dict())
    loop = Loop(cfg, plan, engine, run, hf, TrainConsole(plan.total_steps, cfg.log.interval_s),
                MetricsFile(run.metrics, enabled=engine.is_main), trackers, ThroughputMeter(fpt, engine.world, peak))
    loop.activity, activity.times, loop.times.clock = activity, loop.times, activity.clock
    hosts = dist.all_gather_object(socket.gethostname())  # once: to name a slow rank by its host
    loop.watch = SlowRankWatch(hosts) if engine.is_main else None
    blocks = sparse_blocks(module)
    loop.routers = RouterStats(k or 1) if blocks or k else None
    trainable, total = parameter_counts(module)
    active = f" ({total - inactive:,} active per token: {k} of {blocks[0].n_experts} experts)" if blocks and k else ""
    loop.console.print(f"model {cfg.model.name} ({shape.model_type}): {total:,} parameters{active}, {trainable:,} "
                       f"trainable; {engine.world} process(es), {cfg.train.strategy}; loss: {engine.loss}")
    return loop


def resume(loop: Loop) -> None:
    plan = loop.plan
    load_checkpoint(loop.engine, plan.resume_from, plan.meta)
    loop.start_step = plan.meta["step"]
    moved = f", written by {plan.meta['world_size']} process(es), now {dist.world_size()}" \
        if plan.meta.get("world_size") != dist.world_size() else ""
    loop.console.print(f"resumed from {plan.resume_from} at step {loop.start_step} "
                       f"(epoch {plan.meta['epoch']}, step {plan.meta['step_in_epoch']} of it{moved})")


def finish(loop: Loop, summary: dict) -> dict:
    """Export, then summary.json and curves.png (rank 0)."""
    from distclm.plot import plot_curves

    e = loop.engine
    e.drop_optimizer_state()  # the last checkpoint holds it
    with loop.activity.phase("export"):
        export_run(loop.run.path, engine=e)
    trainable, total = parameter_counts(e.module)
    inactive = inactive_parameters(e.module, top_k(e.module.config))  # a mixture of experts: per token, fewer
    memory = memory_summary(loop.plan.predicted_bytes, e.device)
    summary = {**summary, "params": {"trainable": trainable, "total": total,
                                     **({"active": total - inactive} if inactive else {})}, "memory": memory}
    if e.is_main:
        (loop.run.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        plot_curves(loop.run.metrics, loop.run.path / "curves.png")
    final = "n/a (nothing left to train)" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    loop.console.print(f"done: {summary['steps']} steps, final loss {final}, {summary['tokens_per_s']:.0f} "
                       f"tokens/s, run dir {loop.run.path}; per-rank peak memory {gb(memory['peak_bytes'])}, "
                       f"planned {gb(memory['predicted_bytes'] or 0)}")
    return {**summary, "run_dir": str(loop.run.path)}  # for the push after training (not in summary.json)


def already_done(loop: Loop) -> dict:
    export_run(loop.run.path, engine=loop.engine)
    loop.console.print(f"{loop.run.path} is already complete at step {loop.start_step}; nothing to train "
                       f"(another --run.dir, or --run.resume=none to start over)")
    summary = loop.run.path / "summary.json"
    return {**(json.loads(summary.read_text()) if summary.exists() else {"steps": loop.start_step}),
            "run_dir": str(loop.run.path)}


def train(cfg: Config) -> dict:
    """Entry point. --train.micro_batch_size=auto: on a GPU out-of-memory error the micro-batch is lowered once (the
    global batch unchanged) and the run starts again, resuming from its newest checkpoint if one was written."""
    try:
        return train_once(cfg)
    except Exception as exc:  # noqa: BLE001 - only a CUDA out-of-memory error under micro auto is retried
        smaller = lower_after_oom(cfg, exc, dist.world_size())
        if smaller is None:
            raise
        return train_once(smaller)


def train_once(cfg: Config) -> dict:
    """The phases in order; the process group is closed in `finally`."""
    stop = StopSignal()  # installed first: a SIGTERM during set-up is acted on at the first step boundary
    engine = watchdog = run = None
    activity = Activity()  # this rank's phase and waits: the step parts and the heartbeat read it
    try:
        cfg = for_world(resolve_auto_micro(cfg, dist.world_size()), dist.world_size())
        plan = make_plan(cfg)
        with instrumented(activity):
            engine = build_engine(cfg, plan, activity)
            run = claim_run_dir(cfg, engine, plan.data_fingerprints)
            loop = build_loop(cfg, plan, engine, run, activity)
            watchdog = start_watchdog(activity, run.path, cfg.train.hang_timeout_s)
            if plan.resume_from is not None:
                resume(loop)
            if loop.start_step >= plan.total_steps:
                return already_done(loop)
            try:
                return finish(loop, run_loop(loop, stop))
            finally:
                loop.trackers.close()
    finally:
        if watchdog is not None:
            watchdog.stop()
        if run is not None:  # the run dir's lock, on every way out (a refusal inside claim_run_dir let it go)
            run.release()
        stop.restore()
        # This rank's work is done: the group released under the grace, with the code this run ends with
        # (dist.work_done); the engine is kept, never freed (its Reducer's destructor is the deadlock dist.release
        # describes).
        dist.work_done(exit_code.of(sys.exc_info()[1]), hold=engine)


def train_command(inv) -> int:
    """`distclm train`: 0 done; 143 stopped by SIGTERM after saving (retryable under Kubernetes restart policies);
    1 stopped on non-finite losses. A detected hang never returns here: the watchdog thread names it, dumps stacks
    and exits 75 (distclm.watchdog.HANG_EXIT, EX_TEMPFAIL: retry from the newest checkpoint; docs/hangs.md)."""
    hub_push.before_training(inv.cfg)  # --train.push_to_hub: refused now without --hub.repo_id, warned if it cannot work
    try:
        summary = train(inv.cfg)
    except Preempted as exc:
        print(f"distclm: {exc}", file=sys.stderr)
        return exc.exit_code
    except NonFinite as exc:
        print(f"distclm: error: {exc}", file=sys.stderr)
        return 1
    hub_push.after_training(inv.cfg, summary.get("run_dir"))  # --train.push_to_hub: rank 0, no process group left
    return 0
