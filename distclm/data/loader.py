"""Which blocks each rank trains on, step by step, and how a resume finds its place in O(1).

Epoch e is a seeded permutation of the train blocks, cut into global batches of
G = micro x accum x world blocks; a last partial global batch is dropped (< G blocks, different
ones each epoch). Inside a global batch, the blocks are laid out as [accum][world][micro]:

    micro-batch k of rank r = batch[(k * world + r) * micro : ... + micro]

The run state is (seed, epoch, step in epoch): resuming computes one permutation, replays nothing.
It depends on the world size only through G, so a resume onto another world size with the same
global batch continues the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Position:
    """Where training is: optimizer steps done in total, and the epoch and step within it."""

    step: int
    epoch: int
    step_in_epoch: int


class BlockSampler:
    def __init__(self, n_blocks: int, micro: int, accum: int, world: int, seed: int):
        self.n_blocks, self.micro, self.accum, self.world, self.seed = n_blocks, micro, accum, world, seed
        self.global_batch = micro * accum * world
        self.steps_per_epoch = n_blocks // self.global_batch
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        """The block order of `epoch`: a function of (seed, epoch) only."""
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._perm_epoch = epoch
        return self._perm

    def position(self, step: int) -> Position:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return Position(step, epoch, in_epoch)

    def global_indices(self, step: int) -> np.ndarray:
        """Block ids of global step `step` (0-based), shape (G,), in [accum][world][micro] order."""
        pos = self.position(step)
        start = pos.step_in_epoch * self.global_batch
        return self.permutation(pos.epoch)[start:start + self.global_batch]

    def rank_indices(self, step: int, rank: int) -> np.ndarray:
        """This rank's micro-batches of step `step`, shape (accum, micro)."""
        g = self.global_indices(step).reshape(self.accum, self.world, self.micro)
        return g[:, rank, :]
