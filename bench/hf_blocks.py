"""Prepared blocks as the torch Dataset that `transformers.Trainer` takes (the baselines of bench/)."""

from __future__ import annotations


def trainer_dataset(blocks):
    """A SplitBlocks as a Dataset of {"input_ids", "labels"} rows (Trainer's model shifts the labels)."""
    import numpy as np
    import torch

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            x = torch.from_numpy(blocks[i].astype(np.int64))
            return {"input_ids": x, "labels": x}

    return Blocks()
