"""evaluate(): disjoint rank slices, float64 token-weighted sums, ZeRO-3's uncounted forwards, flat memory.

Ranks are simulated here (local_sums of each rank, summed as the all-reduce would); real processes
are in tests/dist/test_eval_generate.py. The model is a 1-layer GPT-2 with a 97-token vocabulary.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distclm.evaluation import evaluate, local_sums, rank_slice

N_BLOCKS, BLOCK = 31, 16  # 31 = neither even nor a multiple of 3


class ArrayBlocks:
    """The two methods evaluate() uses of a SplitBlocks, over an array (n, block_size)."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def __len__(self) -> int:
        return len(self.arr)

    def batch(self, ids) -> np.ndarray:
        return self.arr[np.asarray(ids, dtype=np.int64)]


class CountingModel(torch.nn.Module):
    """Counts forwards and notes how many earlier outputs are still alive when a new forward starts."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.forwards = 0
        self.max_alive = 0
        self._outputs: list[weakref.ref] = []

    def forward(self, **kwargs):
        self.max_alive = max(self.max_alive, sum(r() is not None for r in self._outputs))
        out = self.inner(**kwargs)
        self._outputs.append(weakref.ref(out.logits))
        self.forwards += 1
        return out


@pytest.fixture(scope="module")
def model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=BLOCK, n_embd=16, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # sharper than a fresh init, so blocks differ in loss and a lost block shows
        m.lm_head.weight.mul_(40.0)
    return m.eval()


@pytest.fixture(scope="module")
def blocks():
    return ArrayBlocks(np.random.default_rng(0).integers(0, 97, size=(N_BLOCKS, BLOCK), dtype=np.uint16))


@pytest.fixture(scope="module")
def ref(model, blocks) -> float:
    return reference_loss(model, blocks)


def reference_loss(model, blocks) -> float:
    """One plain forward per block; NLL summed in float64 over every predicted token."""
    total = 0.0
    with torch.no_grad():
        for i in range(len(blocks)):
            x = torch.from_numpy(blocks.batch([i]).astype(np.int64))
            logits = model(input_ids=x).logits[0, :-1].double()
            total += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
    return total / (len(blocks) * (BLOCK - 1))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 7])
def test_rank_slices_are_disjoint_cover_everything_and_differ_by_at_most_one(world):
    for n in range(0, 40):
        slices = [rank_slice(n, r, world) for r in range(world)]
        assert [i for s in slices for i in s] == list(range(n))
        assert max(map(len, slices)) - min(map(len, slices)) <= 1


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_summed_rank_sums_match_a_plain_forward_per_block(model, blocks, ref, world, batch):
    sums = sum(local_sums(model, blocks, batch, "cpu", r, world) for r in range(world))
    assert sums.dtype == torch.float64
    assert int(sums[1]) == N_BLOCKS * (BLOCK - 1)  # every block once: no padding, no duplicate
    loss = float(sums[0] / sums[1])
    assert abs(math.exp(loss) / math.exp(ref) - 1) < 1e-6
    assert abs(ref - math.log(97)) > 0.5  # not a uniform model: a missing block would move the loss


def test_a_dropped_or_duplicated_block_would_be_seen(model, blocks, ref):
    """The check above has teeth: one block twice instead of another moves the loss far beyond 1e-6."""
    dup = ArrayBlocks(np.concatenate([blocks.arr[:-1], blocks.arr[:1]]))
    assert abs(reference_loss(model, dup) - ref) > 1e-4


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_zero3_mode_runs_the_same_number_of_forwards_on_every_rank(model, blocks, batch):
    world = 3  # slices of 10, 10 and 11 blocks
    plain, collective = [], []
    for r in range(world):
        counting = CountingModel(model)
        s_plain = local_sums(counting, blocks, batch, "cpu", r, world)
        plain.append(counting.forwards)
        counting = CountingModel(model)
        s_coll = local_sums(counting, blocks, batch, "cpu", r, world, collective_forward=True)
        collective.append(counting.forwards)
        assert torch.equal(s_plain, s_coll)  # the extra forwards are not counted
    assert plain == [math.ceil(len(rank_slice(N_BLOCKS, r, world)) / batch) for r in range(world)]
    assert collective == [math.ceil(11 / batch)] * world
    if batch != 4:  # 10 and 11 blocks in batches of 1 or 2: ranks 0 and 1 need extra forwards
        assert plain != collective


def test_a_rank_with_no_block_still_takes_part_under_zero3(model):
    two = ArrayBlocks(np.random.default_rng(1).integers(0, 97, size=(2, BLOCK), dtype=np.uint16))
    counting = CountingModel(model)
    sums = local_sums(counting, two, 8, "cpu", 0, 3, collective_forward=True)  # rank 0 of 3 gets nothing
    assert counting.forwards == 1 and sums.tolist() == [0.0, 0.0]


def test_memory_stays_flat_no_output_outlives_its_batch(model):
    many = ArrayBlocks(np.random.default_rng(2).integers(0, 97, size=(120, BLOCK), dtype=np.uint16))
    counting = CountingModel(model)
    result = evaluate(counting, many, 4, "cpu")
    assert counting.forwards == 30
    assert counting.max_alive == 0  # no logits (or anything holding them) kept across batches
    assert result["tokens"] == 120 * (BLOCK - 1) and result["blocks"] == 120 and result["world_size"] == 1


def test_evaluate_returns_the_design_keys_and_restores_training_mode(model, blocks, ref):
    model.train()
    try:
        result = evaluate(model, blocks, 8, "cpu")
        assert model.training
    finally:
        model.eval()
    assert set(result) == {"loss", "perplexity", "tokens", "blocks", "world_size"}
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert abs(result["loss"] - ref) < 1e-6


def test_run_dir_resolves_to_export_else_newest_complete_checkpoint(tmp_path):
    from distclm.errors import UserError
    from distclm.model import resolve_model_dir

    run = tmp_path / "run"
    (run / "config.yaml").parent.mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    with pytest.raises(UserError, match="distclm export"):
        resolve_model_dir(str(run))
    for step, complete in ((3, True), (12, True), (20, False)):
        model_dir = run / "checkpoints" / f"step-{step}" / "model"
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text("{}")
        (model_dir / "model.safetensors").write_text("")
        if complete:
            (model_dir.parent / "COMPLETE").write_text(f"{step}\n")
    assert resolve_model_dir(str(run)) == str(run / "checkpoints" / "step-12" / "model")  # not 3, not unfinished 20
    (run / "export").mkdir()
    (run / "export" / "config.json").write_text("{}")
    assert resolve_model_dir(str(run)) == str(run / "export")
    assert resolve_model_dir("gpt2-tiny") == "gpt2-tiny" and resolve_model_dir("org/name") == "org/name"
