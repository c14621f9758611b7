"""Faults injected for real: SIGTERM to one rank, NaN losses. Nothing is lost and the run says what happened."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file
from tests.support.cli import start_cli
from tests.support.env import child_env
from tests.support.runs import read_metrics

BASE = ["--model.name=gpt2-tiny", "--train.micro_batch_size=4", "--train.lr=1e-3", "--train.seed=3",
        "--log.every_steps=1", "--log.interval_s=1000", "--eval.max_blocks=16"]


def weights(path):
    return load_file(str(path / "model" / "model.safetensors"))


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def start(nproc, data, run_dir, *extra, hooks=None):
    return start_cli("train", f"--data.dir={data}", f"--run.dir={run_dir}", *BASE, *extra, nproc=nproc,
                     env=child_env(hooks=hooks))


def wait_for_step(run_dir, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.mark.extended  # CI: SIGTERM + exact resume in test_lora, test_elastic, test_observability
def test_sigterm_single_process_saves_exits_143_and_resumes_exactly(pydoc_blocks, tmp_path, shared):
    straight = shared.get("faults-1proc-30")  # uninterrupted reference
    run_dir = tmp_path / "pre"
    proc = start(1, pydoc_blocks, run_dir, "--train.max_steps=30")
    wait_for_step(run_dir, 3, proc)
    t_signal = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert time.time() - t_signal < 30  # within --train.preempt_grace_s (default 30)
    assert "SIGTERM: saved a checkpoint at step" in err
    saved = [p for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").exists()]
    assert len(saved) == 1 and 3 <= int(saved[0].name[5:]) < 30
    # The same command again resumes from it and ends where the uninterrupted run ended.
    again = start(1, pydoc_blocks, run_dir, "--train.max_steps=30")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "resumed from" in out
    ref, got = read_metrics(straight), read_metrics(run_dir)
    np.testing.assert_allclose([got[s]["loss"] for s in range(1, 31)], [ref[s]["loss"] for s in range(1, 31)],
                               atol=1e-6, rtol=0)
    assert same_weights(load_file(str(run_dir / "export" / "model.safetensors")),
                        load_file(str(straight / "export" / "model.safetensors")))


def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_step(pydoc_blocks, tmp_path):
    run_dir = tmp_path / "pre2"
    proc = start(2, pydoc_blocks, run_dir, "--train.max_steps=40")
    wait_for_step(run_dir, 3, proc)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "distclm.cli" in " ".join(c.cmdline())]
    assert len(workers) == 2
    rank1 = next(w for w in workers if w.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGTERM)  # only rank 1 is told; rank 0 learns it through the all-reduced flag
    out, err = proc.communicate(timeout=120)
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").exists()
    step = int(saved[0].name[5:])
    assert json.loads((saved[0] / "meta.json").read_text())["world_size"] == 2
    assert re.search(r"exitcode\s*:\s*143", err)  # torchrun's report of the workers' retryable exit code
    assert max(read_metrics(run_dir)) == step  # no rank went on past the agreed step


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("zero2", marks=pytest.mark.extended)])
def test_nonfinite_steps_are_skipped_then_the_run_stops(pydoc_blocks, tmp_path, strategy):
    run_dir = tmp_path / strategy
    # NaN losses at steps 3, 4, 5 on 2 ranks; a checkpoint every 2 steps.
    proc = start(2, pydoc_blocks, run_dir, "--train.max_steps=12", "--train.save_every=2", "--train.keep_last=5",
                 f"--train.strategy={strategy}", hooks={"DISTCLM_TEST_NAN_STEPS": "3,4,5"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "stopped at step 5: 3 consecutive non-finite steps" in err
    assert re.search(r"^distclm: error: stopped at step 5: .* last good checkpoint: \S+step-4;", err, re.M)
    recs = read_metrics(run_dir)
    assert [s for s, r in recs.items() if r.get("skipped")] == [3, 4, 5]
    assert recs[3]["loss"] is None and recs[2]["loss"] is not None
    ckpts = {int(p.name[5:]): p for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").exists()}
    assert sorted(ckpts) == [2, 4]
    # Steps 3 and 4 applied no update: the weights at step 4 are exactly those of step 2.
    assert same_weights(weights(ckpts[2]), weights(ckpts[4]))
    assert all(np.isfinite(v).all() for v in weights(ckpts[4]).values())


@pytest.mark.extended
def test_skip_mode_keeps_going(pydoc_blocks, tmp_path):
    run_dir = tmp_path / "skip"
    proc = start(1, pydoc_blocks, run_dir, "--train.max_steps=10", "--train.on_nonfinite=skip",
                 hooks={"DISTCLM_TEST_NAN_STEPS": "2,3,4,5,6"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    recs = read_metrics(run_dir)
    assert [s for s, r in recs.items() if r.get("skipped")] == [2, 3, 4, 5, 6]
    assert all(recs[s]["loss"] is not None for s in (7, 8, 9, 10))
    assert out.count("non-finite loss") == 5
