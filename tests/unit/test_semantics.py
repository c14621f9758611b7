"""Training semantics that depend only on the configuration: document-aware attention, the elastic global batch,
weighted mixtures, dropout seeded by the data's place in the batch, slow-rank detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distclm.config import build_config
from distclm.data.loader import BlockSampler, MixtureSampler
from distclm.errors import UserError
from distclm.loss import document_positions, inputs, mean_loss
from distclm.model import build_model

EOS = 50256


def test_positions_restart_after_each_eos():
    x = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, EOS, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    assert document_positions(x, EOS).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0], list(range(9))]


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_within_a_document_b_sees_only_b(preset):
    """Block [A, eos, B]: with `within`, B's logits are B's alone and no gradient reaches A; with `cross` not."""
    model = build_model(preset, 0).eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 50000, (1, 20), generator=g), torch.randint(0, 50000, (1, 12), generator=g)
    block = torch.cat([a, torch.tensor([[EOS]]), b], dim=1)  # (1, 33)
    alone = model(input_ids=b, use_cache=False).logits
    within = model(**inputs(block, EOS)).logits[:, -12:]
    cross = model(**inputs(block, None)).logits[:, -12:]
    assert (within - alone).abs().max() < 1e-5
    assert (cross - alone).abs().max() > 1e-2

    embeds = model.get_input_embeddings()(block).detach().requires_grad_(True)
    for eos, zero in ((EOS, True), (None, False)):
        kwargs = inputs(block, eos)
        kwargs.pop("input_ids")
        logits = model(inputs_embeds=embeds, **kwargs).logits
        loss_b = torch.nn.functional.cross_entropy(logits[0, -12:-1], block[0, -11:])
        (grad,) = torch.autograd.grad(loss_b, embeds)
        assert bool((grad[0, :20] == 0).all()) is zero  # A's embeddings get exactly no gradient from B's loss


def test_within_is_the_model_loss_with_document_positions():
    model = build_model("gpt2-tiny", 0)
    x = torch.randint(0, 50000, (2, 16))
    x[:, 7] = EOS
    reference = model(input_ids=x, labels=x, position_ids=document_positions(x, EOS), use_cache=False).loss
    assert torch.allclose(mean_loss(model, x, EOS), reference)  # (a cache would turn the packed masking off)


def test_global_batch_size_derives_accumulation_and_refuses_a_world_that_does_not_divide_it():
    from distclm.train import for_world

    cfg = build_config(flags={"train.global_batch_size": "8", "train.micro_batch_size": "2"})
    assert [for_world(cfg, w).train.grad_accum for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(UserError, match=r"global_batch_size=8 is not a multiple of --train.micro_batch_size=2 x 3 "
                                        r"process\(es\); world sizes that divide it: 1, 2, 4$"):
        for_world(cfg, 3)
    assert for_world(build_config(), 3).train.grad_accum == 1  # unset: the flags as given


def test_sampler_layout_does_not_depend_on_the_world_size():
    """Micro-batch j of a step holds the same blocks on 1, 2 or 4 processes (global batch 8, micro 2)."""
    layouts = [BlockSampler(500, micro=2, accum=8 // (2 * w), world=w, seed=3) for w in (1, 2, 4)]
    for step in (0, 7, 61, 62, 200):
        micro = [np.concatenate([s.rank_indices(step, r)[k] for k in range(s.accum) for r in range(s.world)])
                 for s in layouts]
        assert all(np.array_equal(micro[0], m) for m in micro)


def test_mixture_proportions_over_1000_steps_and_each_folders_own_epochs():
    s = MixtureSampler([900, 250], ["0.7", "0.3"], micro=2, accum=2, world=2, seed=0)
    ids = np.concatenate([s.global_indices(step) for step in range(1000)])
    share = (ids < 900).mean()
    assert abs(share - 0.7) < 0.01 and abs((ids >= 900).mean() - 0.3) < 0.01
    assert (ids >= 900).sum() == s.taken(1, 1000 * 8) == 2400  # folder 2 ran through 9.6 of its own epochs
    assert all(sorted(s._block(1, k) for k in range(e * 250, (e + 1) * 250)) == list(range(250)) for e in range(9))
    assert [s._block(1, k) for k in range(250)] != [s._block(1, k) for k in range(250, 500)]  # a new order each
    counts = [((s.global_indices(step) < 900).sum()) for step in range(50)]
    assert set(counts) <= {5, 6}  # every global batch of 8: 0.7 x 8 = 5.6 of folder 1, to within one block


def test_mixture_resume_is_o1_and_the_same_on_any_world_size():
    a = MixtureSampler([900, 250], ["2", "1"], micro=2, accum=4, world=1, seed=5)
    b = MixtureSampler([900, 250], ["2", "1"], micro=2, accum=1, world=4, seed=5)
    fresh = MixtureSampler([900, 250], ["2", "1"], micro=2, accum=4, world=1, seed=5)
    for step in (3, 999, 12_345):
        assert np.array_equal(a.global_indices(step), b.global_indices(step))
        assert np.array_equal(fresh.global_indices(step), a.global_indices(step))  # no history needed


def test_dropout_seed_depends_on_step_and_position_only():
    from distclm.loop import micro_seed

    assert micro_seed(0, 5, 1) == micro_seed(0, 5, 1)
    assert len({micro_seed(0, 5, 1), micro_seed(0, 5, 2), micro_seed(0, 6, 1), micro_seed(1, 5, 1)}) == 4


def test_slow_rank_is_named_after_three_intervals_and_waiting_is_never_blamed():
    from distclm.straggler import SlowRankWatch, slow, summary

    # rows: data, compute, optimizer (own work, waits left out), comm, wait: seconds per step
    fine = [[0.01, 0.30, 0.01, 0.20, 0.22], [0.01, 0.32, 0.01, 0.02, 0.02]]  # rank 0 waits for rank 1: no alarm
    assert slow(fine) == {}
    slow_reads = [[0.01, 0.50, 0.01, 0.22, 0.22], [0.21, 0.50, 0.01, 0.02, 0.02]]
    assert slow(slow_reads) == {(1, "data"): (0.21, 0.01)}
    watch = SlowRankWatch(["node-a", "node-b"])
    said = [watch.update(slow_reads) for _ in range(4)]
    assert said == [[], [], ["rank 1 (node-b) is slow: data wait 0.21 s/step, median 0.01 s"], []]
    assert summary(slow_reads)["data"] == {"max": 0.21, "median": 0.11, "max_rank": 1}
    assert slow([[0.011, 0.5, 0.01, 0, 0], [0.02, 0.5, 0.01, 0, 0]]) == {}  # 2x, but 0.009 s is noise on 0.5 s
    # Slow in compute: the fast ranks' forward+backward walls look alike (they wait inside the backward), their
    # own work does not. 3 ranks, rank 2 computes 0.30 s, the others 0.10 s and wait 0.20 s for it.
    compute = [[0.01, 0.10, 0.01, 0.01, 0.21], [0.01, 0.10, 0.01, 0.01, 0.21], [0.01, 0.30, 0.01, 0.01, 0.01]]
    assert slow(compute) == {(2, "compute"): (0.30, 0.10)}
    assert summary(compute)["wait"] == {"max": 0.21, "median": 0.21, "max_rank": 0}


def test_step_times_leave_waits_out_of_own_work():
    from distclm.straggler import StepTimes

    times = StepTimes()
    for _ in range(2):
        times.span("compute", 0.0, 0.5)  # forward+backward wall 0.5 s, of which 0.3 s blocked in an all-reduce
        times.wait("compute", 1.0, 1.3)
        times.span("comm", 0.0, 0.1)
        times.wait("comm", 0.0, 0.08)
        times.step_done()
    data, compute, optimizer, comm, wait = times.take()
    assert (data, optimizer) == (0.0, 0.0) and abs(compute - 0.2) < 1e-9 and abs(comm - 0.1) < 1e-9
    assert abs(wait - 0.38) < 1e-9 and times.take() == [0.0] * 5


def test_mixture_settings_are_checked():
    from distclm.data import mixture

    cfg = build_config(flags={"data.dir": "a,b", "data.weights": "0.7,0.3"})
    assert mixture.weights(cfg, 2) == ["0.7", "0.3"]
    for bad, message in (("0.7", "1 weight"), ("0.7,-1", "positive"), ("x,y", "positive")):
        with pytest.raises(UserError, match=message):
            mixture.weights(build_config(flags={"data.weights": bad}), 2)
    assert mixture.weights(build_config(), 3) == ["1", "1", "1"]
