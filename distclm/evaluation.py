"""Token-weighted distributed evaluation -> loss and perplexity, the same for any world size or batch size.

Each rank takes a disjoint contiguous slice of the split's blocks (no padding, no duplicates):

    rank r of W gets blocks [n*r//W, n*(r+1)//W)
    global_loss = sum_ranks(sum of token NLL) / sum_ranks(predicted tokens)      (float64, one all-reduce)

(a masked folder, chat / prompt_completion: over its labels only, the supervised tokens)
    perplexity  = exp(global_loss)

The loss is the cross-entropy alone: a mixture of experts' own loss, given labels, also
holds its routers' balancing loss (training keeps it, loss.py); the NLL sums here never include it.
Every block predicts block_size - 1 tokens. Only running sums are kept: memory does not grow with
the split. Under ZeRO-3 every forward is collective, so a rank with a shorter slice runs extra
forwards on a block it does not count.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from distclm import dist
from distclm.errors import UserError
from distclm.loss import label_count, nll_sum


def rank_slice(n: int, rank: int, world: int) -> range:
    return range(n * rank // world, n * (rank + 1) // world)


@torch.no_grad()
def local_sums(model, blocks, batch_size: int, device, rank: int, world: int,
               collective_forward: bool = False, eos: int | None = None) -> torch.Tensor:
    """[NLL sum, predicted tokens] (float64) of rank `rank`'s slice of `blocks` (a SplitBlocks)."""
    n = len(blocks)
    mine = rank_slice(n, rank, world)
    n_batches = math.ceil(len(mine) / batch_size)
    if collective_forward:  # ZeRO-3: every rank runs as many forwards as the longest slice
        longest = max(len(rank_slice(n, r, world)) for r in range(world))
        n_batches = math.ceil(longest / batch_size)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for b in range(n_batches):
        ids = list(mine[b * batch_size:(b + 1) * batch_size])
        counted = bool(ids)
        if not counted:
            ids = [0]  # an uncounted forward that keeps ZeRO-3's collectives in step
        x = torch.from_numpy(blocks.batch(ids).astype(np.int64)).to(device)  # (B, T)
        flags = blocks.flags(ids) if getattr(blocks, "masked", False) else None  # (B, T) LOSS/START of a masked folder
        loss = nll_sum(model, x, eos, None if flags is None else torch.from_numpy(flags).to(device))
        if counted:
            sums[0] += loss
            # B x (T - 1) predicted tokens; in a masked folder, the labels among them
            sums[1] += x.numel() - x.size(0) if flags is None else label_count(flags)
    return sums


def finish(sums: torch.Tensor, n_blocks: int, world: int) -> dict:
    """Global [NLL sum, tokens] -> {"loss", "perplexity", "tokens", "blocks", "world_size"}."""
    nll, tokens = float(sums[0].item()), int(sums[1].item())
    loss = nll / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"),
            "tokens": tokens, "blocks": n_blocks, "world_size": world}


def evaluate(model, blocks, batch_size: int, device, collective_forward: bool = False, eos: int | None = None) -> dict:
    """Loss and perplexity over all of `blocks`; every rank calls it and gets the same numbers."""
    was_training = model.training
    model.eval()
    try:
        sums = local_sums(model, blocks, batch_size, device, dist.rank(), dist.world_size(), collective_forward, eos)
    finally:
        if was_training:
            model.train()
    # global_loss = sum_ranks(nll_sum) / sum_ranks(tokens): one all-reduce of two float64 numbers
    dist.all_reduce_sum(sums)
    return finish(sums, len(blocks), dist.world_size())


def evaluate_splits(model, splits: list, batch_size: int, device, collective_forward: bool = False,
                    eos: int | None = None) -> dict:
    """[(folder, blocks, weight)] -> one folder's result, or the mixture's (each folder's under "by_dir")."""
    from distclm.data import mixture

    results = [(name, evaluate(model, blocks, batch_size, device, collective_forward, eos))
               for name, blocks, _ in splits]
    return results[0][1] if len(results) == 1 else mixture.combine(results, [w for _, _, w in splits])


def write_result(result: dict, path: str) -> None:
    import json

    from distclm.atomic import atomic_write, disk_full_is_one_line

    with disk_full_is_one_line(f"--eval.output={path}", Path(path).parent, "the result is printed above; no file was "
                                                                          "written"):
        atomic_write(Path(path), (json.dumps(result, indent=2) + "\n").encode())


def eval_command(inv) -> int:
    """`distclm eval`: perplexity of --model.name on --data.dir's --eval.split; rank 0 prints and writes JSON.

    --train.strategy=zero3 builds the model partitioned across the ranks (DeepSpeed ZeRO-3, every forward
    collective): no rank ever holds all of it. Any other strategy keeps a full copy on every rank. Several
    folders (--data.dir=a,b): each one's perplexity and the --data.weights weighted one.
    """
    from distclm.atomic import check_writable
    from distclm.engine import Engine
    from distclm.loss import install
    from distclm.model import ModelShape, build_model, load_config, quiet_loading, resolve_model_dir

    cfg = inv.cfg
    if not cfg.model.name:
        raise UserError("--model.name is required: a run dir, a Hugging Face folder or a hub id")
    if cfg.eval.output:  # before anything is evaluated: a result that cannot be written fails first, not last
        check_writable(cfg.eval.output, "--eval.output", kind="file", beside=True)
    quiet_loading()
    shape = ModelShape.of(load_config(cfg.model.name, cfg.model.trust_remote_code))
    readers, splits = eval_data(cfg, shape)
    engine = Engine.start(cfg.train, shape.hidden_size, training=False)
    try:
        model = build_model(cfg.model.name, cfg.train.seed, cfg.model.trust_remote_code)
        install(model, cfg.train.fused_loss)
        engine.wrap_for_inference(model)
        held = "partitioned across processes (DeepSpeed ZeRO-3)" if engine.forward_is_collective else \
            "a full copy per process"
        if engine.is_main:
            print(f"eval: {resolve_model_dir(cfg.model.name)} on {cfg.data.dir} [{cfg.eval.split}], "
                  f"{sum(len(b) for _, b, _ in splits):,} blocks{' (--eval.max_blocks)' if cfg.eval.max_blocks else ''}"
                  f", {engine.world} process(es), weights {held}", flush=True)
        eos = readers[0].eos_token_id if cfg.train.doc_attention == "within" else None
        result = evaluate_splits(engine.model, splits, cfg.eval.batch_size, engine.device,
                                 engine.forward_is_collective, eos)
    finally:
        for reader in readers:
            reader.close()
        engine.close()
    if engine.is_main:
        report(result, cfg.eval.output)
    return 0


def eval_data(cfg, shape):
    """The prepared folder(s) of --data.dir, checked against the model -> (readers, [(folder, blocks, weight)])."""
    from distclm.rundir import open_data

    readers, ws = open_data(cfg, shape, verify=False)
    try:
        return readers, [(str(r.folder), eval_blocks(r, cfg.eval.split, cfg.eval.max_blocks), w)
                         for r, w in zip(readers, ws)]
    except UserError:
        for r in readers:
            r.close()
        raise


def eval_blocks(reader, split: str, max_blocks: int | None = None):
    """The blocks of `split` to evaluate (the first `max_blocks`); none at all is refused: a perplexity of no tokens
    is nan, not a result."""
    blocks = reader.split(split).first(max_blocks)
    if len(blocks) == 0:
        names = ", ".join(f"{k} ({len(b):,} blocks)" for k, b in reader.splits.items())
        raise UserError(f"--data.dir={reader.folder}: its {split!r} split has 0 blocks, nothing to evaluate; choose "
                        f"another --eval.split (splits there: {names}) or prepare it again with validation "
                        f"documents (--data.val_fraction > 0 or --data.val_docs)")
    return blocks


def report(result: dict, output: str | None) -> None:
    for name, r in result.get("by_dir", {}).items():
        print(f"{name}: loss {r['loss']:.6f}  perplexity {r['perplexity']:.6f}  tokens {r['tokens']:,}")
    print(f"loss: {result['loss']:.6f}  tokens: {result['tokens']:,}  blocks: {result['blocks']:,}  "
          f"world_size: {result['world_size']}")
    print(f"perplexity: {result['perplexity']:.6f}")
    if output:
        write_result(result, output)
