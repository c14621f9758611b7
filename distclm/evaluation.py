"""Token-weighted distributed evaluation -> loss and perplexity, the same for any world size or batch size.

Each rank takes a disjoint contiguous slice of the split's blocks (no padding, no duplicates):

    rank r of W gets blocks [n*r//W, n*(r+1)//W)
    global_loss = sum_ranks(sum of token NLL) / sum_ranks(predicted tokens)      (float64, one all-reduce)
    perplexity  = exp(global_loss)

Every block predicts block_size - 1 tokens. Only running sums are kept: memory does not grow with
the split. Under ZeRO-3 every forward is collective, so a rank with a shorter slice runs extra
forwards on a block it does not count.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distclm import dist


def rank_slice(n: int, rank: int, world: int) -> range:
    return range(n * rank // world, n * (rank + 1) // world)


def nll_sum(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of a batch (B, T) in float64: sum over B x (T-1) predicted tokens."""
    logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
    logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:]
    # Per-token NLL in float32 (as the model computes it), summed in float64: the sum does not
    # drift with the number of tokens in a batch, so batch size leaves the result unchanged.
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return nll.double().sum()


@torch.no_grad()
def local_sums(model, blocks, batch_size: int, device, rank: int, world: int,
               collective_forward: bool = False) -> torch.Tensor:
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
        loss = nll_sum(model, x)
        if counted:
            sums[0] += loss
            sums[1] += x.numel() - x.size(0)  # B x (T - 1) predicted tokens
    return sums


def finish(sums: torch.Tensor, n_blocks: int, world: int) -> dict:
    """Global [NLL sum, tokens] -> {"loss", "perplexity", "tokens", "blocks", "world_size"}."""
    nll, tokens = float(sums[0].item()), int(sums[1].item())
    loss = nll / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan"),
            "tokens": tokens, "blocks": n_blocks, "world_size": world}


def evaluate(model, blocks, batch_size: int, device, collective_forward: bool = False) -> dict:
    """Loss and perplexity over all of `blocks`; every rank calls it and gets the same numbers."""
    was_training = model.training
    model.eval()
    try:
        sums = local_sums(model, blocks, batch_size, device, dist.rank(), dist.world_size(), collective_forward)
    finally:
        if was_training:
            model.train()
    # global_loss = sum_ranks(nll_sum) / sum_ranks(tokens): one all-reduce of two float64 numbers
    dist.all_reduce_sum(sums)
    return finish(sums, len(blocks), dist.world_size())


def write_result(result: dict, path: str) -> None:
    import json

    from distclm.atomic import atomic_write

    atomic_write(Path(path), (json.dumps(result, indent=2) + "\n").encode())


def eval_command(cfg) -> int:
    """`distclm eval`: perplexity of --model.name on --data.dir's --eval.split; rank 0 prints and writes JSON.

    --train.strategy=zero3 builds the model partitioned across the ranks (DeepSpeed ZeRO-3, every forward
    collective): no rank ever holds all of it. Any other strategy keeps a full copy on every rank.
    """
    from distclm.data.blocks import BlockReader
    from distclm.engine import Engine
    from distclm.errors import UserError
    from distclm.generate import quiet_loading
    from distclm.model import ModelShape, build_model, check_data_fits, load_config, resolve_model_dir

    if not cfg.model.name:
        raise UserError("--model.name is required: a run dir, a Hugging Face folder or a hub id")
    if not cfg.data.dir:
        raise UserError("--data.dir is required: a folder made by `distclm prepare`")
    reader = BlockReader(cfg.data.dir)
    blocks = reader.split(cfg.eval.split).first(cfg.eval.max_blocks)
    quiet_loading()
    shape = ModelShape.of(load_config(cfg.model.name, cfg.model.trust_remote_code))
    check_data_fits(shape, reader, f"--model.name={cfg.model.name}")
    engine = Engine.start(cfg.train, shape.hidden_size, training=False)
    try:
        engine.wrap_for_inference(build_model(cfg.model.name, cfg.train.seed, cfg.model.trust_remote_code))
        held = "partitioned across processes (DeepSpeed ZeRO-3)" if engine.forward_is_collective else \
            "a full copy per process"
        if engine.is_main:
            print(f"eval: {resolve_model_dir(cfg.model.name)} on {cfg.data.dir} [{cfg.eval.split}], "
                  f"{len(blocks):,} blocks{' (--eval.max_blocks)' if cfg.eval.max_blocks else ''}, {engine.world} "
                  f"process(es), weights {held}", flush=True)
        result = evaluate(engine.model, blocks, cfg.eval.batch_size, engine.device,
                          collective_forward=engine.forward_is_collective)
    finally:
        reader.close()
        engine.close()
    if engine.is_main:
        print(f"loss: {result['loss']:.6f}  tokens: {result['tokens']:,}  blocks: {result['blocks']:,}  "
              f"world_size: {result['world_size']}")
        print(f"perplexity: {result['perplexity']:.6f}")
        if cfg.eval.output:
            write_result(result, cfg.eval.output)
    return 0
