"""Rank and world from the launcher's environment; helpers that work with or without a process group.

torchrun, the deepspeed launcher, accelerate and Slurm-through-torchrun all set RANK, WORLD_SIZE,
LOCAL_RANK (and LOCAL_WORLD_SIZE). With none set this is one process: rank 0 of 1. Nothing here
imports torch at module level, so data code can ask "am I rank 0?" cheaply.
"""

from __future__ import annotations

import os
import sys


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))


def is_rank0() -> bool:
    return rank() == 0


def _pg():
    """The default process group's torch.distributed, or None when there is none."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as td

    return td if td.is_available() and td.is_initialized() else None


def barrier() -> None:
    td = _pg()
    if td is not None:
        td.barrier()


def all_reduce_sum(values):
    """Sum a float64 tensor across ranks in place (no-op on one process); returns it."""
    td = _pg()
    if td is not None and td.get_world_size() > 1:
        td.all_reduce(values, op=td.ReduceOp.SUM)
    return values


def broadcast_object(obj):
    """Rank 0's `obj` (any picklable value) on every rank; `obj` itself with no process group."""
    td = _pg()
    if td is None or td.get_world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def destroy() -> None:
    """barrier + destroy_process_group before exit: avoids a rare abort at interpreter shutdown."""
    td = _pg()
    if td is not None:
        try:
            td.barrier()
        finally:
            td.destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on now (for a 1-node rendezvous on 127.0.0.1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launch_env() -> None:
    """One process started without a launcher: the environment a 1-process group needs."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
