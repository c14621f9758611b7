"""Parameter groups and the learning-rate schedule. Pure: no torch.distributed, no accelerate/deepspeed.

AdamW decays matrices only: biases and normalisation weights (every 1-D tensor) get weight decay 0,
as in the Hugging Face Trainer. The schedule is a multiplier of the peak lr after `step` optimizer
steps, stepped once per optimizer step (never per process or per micro-batch).
"""

from __future__ import annotations

import math

BETAS = (0.9, 0.999)
EPS = 1e-8


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: decay on matrices, none on 1-D tensors."""
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            # ds_shape: a ZeRO-3 partitioned parameter's full shape (its local tensor is flat)
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # (LoRA has no 1-D parameter; ZeRO would drop an empty group)


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


def build_optimizer_and_schedule(model, t, total_steps: int, adam_class=None):
    """AdamW over `param_groups` (fused torch AdamW unless `adam_class`, e.g. DeepSpeedCPUAdam) + LambdaLR."""
    import torch

    groups = param_groups(model, t.weight_decay)
    if adam_class is None:
        # fused: one kernel per parameter group instead of a loop over tensors (CPU and CUDA)
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=BETAS, eps=EPS, fused=True)
    else:
        optimizer = adam_class(groups, lr=t.lr, betas=BETAS, eps=EPS, adamw_mode=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.schedule, t.warmup_steps, total_steps))
    return optimizer, scheduler
