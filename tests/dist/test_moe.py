"""Mixture-of-experts models whose experts are separate modules, under ZeRO-3, and the expert load in view.

The model is tests/support/toy_moe.py (defined in the tests, loaded as a custom model through transformers' Auto
classes): experts a ModuleList of MLPs, routing forced so that a block whose first token id is a multiple of 4
never reaches experts 2 and 3. Global batch 2 blocks of 64 tokens, 10 steps (seed 4: in 4 steps one rank's block
skips experts 2-3 while the other's reaches them; in no step do both skip them, see below):
  ddp-1     1 process, DDP, micro 1 x accumulation 2 (the balancing loss is a function of each micro-batch)
  zero3-2   2 processes, ZeRO-3, micro 1: sparse blocks found from the structure and marked ZeRO-3 leaves
  hang      zero3-2 with --train.z3_leaf_modules=none: in the first step where the ranks part, the one whose block
            is barred gathers experts 0-1 only while the other gathers expert 2: the collectives no longer pair up.
            NCCL waits forever (the known hang); gloo sees sizes that differ and aborts: either way the run stops
            in that step (bounded here by --train.dist_timeout_s and a subprocess timeout).
"""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from distclm.data.blocks import BlockReader
from tests.support import toy_moe
from tests.support.cli import command
from tests.support.env import REPO, child_env
from tests.support.runs import block_ids, read_metrics, train

STEPS = 10
COMMON = (f"--train.max_steps={STEPS}", "--train.lr=1e-2", "--train.seed=4", "--train.micro_batch_size=1",
          "--eval.max_blocks=8", "--log.block_ids=true")
TOY = child_env(hooks={"DISTCLM_TEST_TOY_MOE": "1"})


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy-moe")
    toy_moe.save(folder, seed=1)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pydoc_blocks, toy):
    root = tmp_path_factory.mktemp("moe-zero3")
    train(1, root / "ddp-1", pydoc_blocks, *COMMON, "--train.grad_accum=2", model=str(toy), env=TOY)
    zero3 = train(2, root / "zero3-2", pydoc_blocks, *COMMON, "--train.strategy=zero3", model=str(toy), env=TOY)
    return root, zero3


def routes_apart(run_dir, data) -> list[int]:
    """Steps in which one rank's block was barred from experts 2-3 and the other's was not."""
    split = BlockReader(data).split("train")
    barred = {r: {s: int(split.batch(ids)[0, 0]) % 4 == 0 for s, ids in block_ids(run_dir, r).items()} for r in (0, 1)}
    return [s for s in barred[0] if barred[0][s] != barred[1][s]]


def test_zero3_with_separate_experts_matches_ddp(runs, pydoc_blocks):
    root, zero3 = runs
    assert routes_apart(root / "zero3-2", pydoc_blocks)  # the premise: some rank skipped experts 2-3 in a step
    ddp, z3 = read_metrics(root / "ddp-1"), read_metrics(root / "zero3-2")
    # Every expert got a token in every global batch: an expert with none at all is skipped by torch's AdamW under
    # DDP (its gradient is None) but stepped with a zero gradient by ZeRO (momentum, weight decay): not the subject here.
    assert all(ddp[s]["experts"]["idle"] == 0 for s in ddp)
    a, b = [ddp[s]["loss"] for s in range(1, STEPS + 1)], [z3[s]["loss"] for s in range(1, STEPS + 1)]
    assert a[-1] < a[0] - 0.5  # it learned
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
    np.testing.assert_allclose([z3[s]["aux_loss"] for s in z3], [ddp[s]["aux_loss"] for s in ddp], rtol=0, atol=1e-4)
    assert "active per token: 2 of 4 experts" in zero3.out


@pytest.mark.extended  # ~45 s
def test_without_leaf_marking_the_same_run_hangs(tmp_path, pydoc_blocks, toy):
    args = [f"--data.dir={pydoc_blocks}", f"--model.name={toy}", f"--run.dir={tmp_path / 'hang'}", *COMMON,
            "--train.strategy=zero3", "--train.z3_leaf_modules=none", "--train.dist_timeout_s=20",
            "--log.every_steps=1"]
    t0 = time.monotonic()
    proc = subprocess.Popen(command("train", args, 2), env=TOY, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes it on to its workers
        out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.monotonic() - t0 < 300, out[-2000:]
    assert "collective mismatch" in err or "timed out" in err.lower(), err[-4000:]
    done = max(read_metrics(tmp_path / "hang"), default=0)
    assert done + 1 == min(routes_apart(tmp_path / "hang", pydoc_blocks))  # it stopped where the ranks parted


def test_a_collapse_shows_in_the_expert_load_console_and_curves(runs, tmp_path, pydoc_blocks):
    """The same toy with every router pushed onto expert 0 (a bias of +8 on its logit, 1 expert per token) against
    the balanced runs above: max_share ~1 and 3 idle experts per layer, in metrics.jsonl, the console and curves.png."""
    from PIL import Image

    root, _ = runs
    toy_moe.save(tmp_path / "collapsed", seed=1, num_experts_per_tok=1, router_bias=[8.0, 0.0, 0.0, 0.0])
    r = train(1, tmp_path / "run", pydoc_blocks, "--train.max_steps=3", "--train.micro_batch_size=2",
              "--eval.max_blocks=8", model=str(tmp_path / "collapsed"), env=TOY)
    collapsed, normal = read_metrics(tmp_path / "run"), read_metrics(root / "ddp-1")
    assert all(c["experts"]["max_share"] > 0.97 and c["experts"]["idle"] == 2 * 3 for c in collapsed.values())
    assert all(n["experts"]["max_share"] < 0.5 and n["experts"]["idle"] == 0 for n in normal.values())
    assert min(c["aux_loss"] for c in collapsed.values()) > 3.5 > 2.0 > max(n["aux_loss"] for n in normal.values())
    assert "experts max_share 1.00 idle 6" in r.out or "experts max_share 0.99 idle 6" in r.out
    assert Image.open(tmp_path / "run" / "curves.png").size[0] == 1500  # the third panel: the experts' load
