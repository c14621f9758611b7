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

import numpy as np
import torch
import torch.nn.functional as F

from distclm import dist


def rank_slice(n: int, rank: int, world: int) -> range:
    return range(n * rank // world, n * (rank + 1) // world)


def nll_sum(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of a batch (B, T) in float64: sum over B x (T-1) predicted tokens."""
    logits = model(input_ids=input_ids).logits  # (B, T, V)
    logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
    return loss.double()


@torch.no_grad()
def evaluate(model, blocks, batch_size: int, device, collective_forward: bool = False) -> dict:
    """{"loss", "perplexity", "tokens", "blocks", "world_size"} over all of `blocks` (a SplitBlocks)."""
    rank, world = dist.rank(), dist.world_size()
    n = len(blocks)
    mine = rank_slice(n, rank, world)
    n_batches = math.ceil(len(mine) / batch_size)
    if collective_forward:  # ZeRO-3: every rank runs as many forwards as the longest slice
        longest = max(len(rank_slice(n, r, world)) for r in range(world))
        total_batches = math.ceil(longest / batch_size)
    else:
        total_batches = n_batches
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [NLL sum, predicted tokens]
    for b in range(total_batches):
        ids = list(mine[b * batch_size:(b + 1) * batch_size])
        counted = bool(ids)
        if not counted:
            ids = [0]  # an uncounted forward that keeps ZeRO-3's collectives in step
        x = torch.from_numpy(blocks.batch(ids).astype(np.int64)).to(device)
        loss = nll_sum(model, x)
        if counted:
            sums[0] += loss
            sums[1] += x.numel() - x.size(0)
    dist.all_reduce_sum(sums)
    if was_training:
        model.train()
    loss = (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if loss == loss else float("nan"),
            "tokens": int(sums[1].item()), "blocks": n, "world_size": world}


def eval_command(cfg) -> int:
    """`distclm eval`: perplexity of --model.name on --data.dir's --eval.split; rank 0 prints and writes JSON."""
    import json
    import os
    from datetime import timedelta

    from distclm.data.blocks import BlockReader
    from distclm.errors import UserError
    from distclm.model import load_model

    if not cfg.model.name:
        raise UserError("--model.name is required: a run dir, a Hugging Face folder or a hub id")
    if not cfg.data.dir:
        raise UserError("--data.dir is required: a folder made by `distclm prepare`")
    reader = BlockReader(cfg.data.dir)
    blocks = reader.split(cfg.eval.split)
    model = load_model(cfg.model.name, cfg.model.trust_remote_code)
    reader.check_model(model.config.vocab_size, model.config.n_positions, f"--model.name={cfg.model.name}")
    import torch.distributed as td

    from distclm.accel import pick_backend

    backend = pick_backend(cfg)
    if dist.world_size() > 1 and not td.is_initialized():
        td.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    device = torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    try:
        result = evaluate(model, blocks, cfg.eval.batch_size, device)
    finally:
        if td.is_initialized():
            td.barrier()
            td.destroy_process_group()
    if dist.is_rank0():
        print(f"loss: {result['loss']:.6f}  tokens: {result['tokens']:,}  blocks: {result['blocks']:,}  "
              f"world_size: {result['world_size']}")
        print(f"perplexity: {result['perplexity']:.6f}")
        if cfg.eval.output:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.eval.output)), exist_ok=True)
            with open(cfg.eval.output, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2)
                fh.write("\n")
    return 0
