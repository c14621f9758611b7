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


class MixtureSampler:
    """Global batches drawn from several prepared folders in fixed proportions (--data.weights).

    Slot n of the run (n = step x G + i) belongs to folder f for exactly floor(n P_f) - floor(n P_(f-1)) of the
    first n slots, P_f the cumulative normalised weights (exact fractions): every global batch holds each
    folder's share to within one block, and where step s stands in every folder is known in O(1). Folder f
    serves its k-th block from its own epoch k // n_f, a permutation seeded by (seed, f, epoch): each folder's
    epochs count on their own, and nothing is dropped. The G blocks of a step are shuffled by (seed, step) so
    that micro-batches mix folders; the layout [accum][world][micro] then splits them over the ranks as in
    BlockSampler, so the order does not depend on the world size for the same global batch.

    Block ids are global: folder f's block i is id offsets[f] + i (MixedBlocks reads them).
    """

    def __init__(self, sizes: list[int], weights: list, micro: int, accum: int, world: int, seed: int):
        from fractions import Fraction

        total = sum(Fraction(str(w)) for w in weights)
        running, self.cumulative = Fraction(0), []
        for w in weights:
            running += Fraction(str(w)) / total
            self.cumulative.append(running)
        self.sizes, self.micro, self.accum, self.world, self.seed = sizes, micro, accum, world, seed
        self.global_batch = micro * accum * world
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.steps_per_epoch = sum(sizes) // self.global_batch  # a nominal epoch: as many blocks as all folders hold
        self._perms: dict = {}

    def taken(self, folder: int, slots: int) -> int:
        """Blocks folder `folder` served in the first `slots` slots of the run."""
        upto = (slots * self.cumulative[folder]).__floor__()
        return upto - ((slots * self.cumulative[folder - 1]).__floor__() if folder else 0)

    def _block(self, folder: int, k: int) -> int:
        epoch, i = divmod(k, self.sizes[folder])
        if (folder, epoch) not in self._perms:
            self._perms = {key: p for key, p in self._perms.items() if key[0] != folder}  # one epoch per folder
            self._perms[(folder, epoch)] = np.random.default_rng([self.seed, folder, epoch]).permutation(
                self.sizes[folder])
        return int(self._perms[(folder, epoch)][i])

    def position(self, step: int) -> Position:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return Position(step, epoch, in_epoch)

    def global_indices(self, step: int) -> np.ndarray:
        """Global block ids of step `step` (0-based), shape (G,), in [accum][world][micro] order."""
        g = self.global_batch
        ids = [self.offsets[f] + self._block(f, k) for f in range(len(self.sizes))
               for k in range(self.taken(f, step * g), self.taken(f, (step + 1) * g))]
        mix = np.random.default_rng([self.seed, len(self.sizes), step]).permutation(g)
        return np.asarray(ids, dtype=np.int64)[mix]

    def rank_indices(self, step: int, rank: int) -> np.ndarray:
        """This rank's micro-batches of step `step`, shape (accum, micro)."""
        return self.global_indices(step).reshape(self.accum, self.world, self.micro)[:, rank, :]


class MixedBlocks:
    """Several folders' splits read as one: global id offsets[f] + i is block i of folder f."""

    def __init__(self, splits: list):
        self.splits = splits
        self.block_size = splits[0].block_size
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in splits])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, indices) -> np.ndarray:
        """Blocks at global ids `indices`, shape (len(indices), block_size)."""
        indices = np.asarray(indices, dtype=np.int64)
        folder = np.searchsorted(self.offsets, indices, side="right") - 1
        return np.stack([self.splits[f][int(i - self.offsets[f])] for f, i in zip(folder, indices)])

    def flags(self, indices) -> np.ndarray | None:
        """LOSS/START flags at global ids `indices` (len(indices), block_size) when any folder is masked (a text
        folder's block: every token a label, one segment), else None."""
        if not any(s.masked for s in self.splits):
            return None
        from distclm.data.blocks import LOSS, START

        indices = np.asarray(indices, dtype=np.int64)
        folder = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.full((len(indices), self.block_size), LOSS, dtype=np.uint8)
        out[:, 0] = START
        for row, (f, i) in enumerate(zip(folder, indices)):
            if self.splits[f].masked:
                out[row] = self.splits[f].flags([int(i - self.offsets[f])])[0]
        return out
