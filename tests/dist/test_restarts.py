"""Killed processes lose nothing: a rank SIGKILLed under torchrun --max-restarts, a kill during a checkpoint write."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file
from tests.support.env import REPO, child_env
from tests.support.runs import read_metrics

ARGS = ["--model.name=gpt2-tiny", "--train.micro_batch_size=4", "--train.lr=1e-3", "--train.seed=3",
        "--log.every_steps=1", "--log.interval_s=1000", "--log.block_ids=true", "--eval.max_blocks=16"]


def torchrun(data, run_dir, *extra, restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "-m", "distclm.cli", "train", f"--data.dir={data}",
           f"--run.dir={run_dir}", *ARGS, *extra]
    return subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line).get("step", 0) for line in path.read_text().splitlines()), default=0)


def block_order(run_dir, rank) -> dict[int, list[int]]:
    """step -> block ids; a step repeated after a restart counts once, its last time."""
    rows = {}
    for line in (run_dir / f"block_ids-rank{rank}.txt").read_text().splitlines():
        step, *ids = map(int, line.split())
        rows[step] = ids
    return rows


def workers(proc) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "distclm.cli" in " ".join(c.cmdline())]


@pytest.mark.extended  # ~100 s: a kill, torchrun's restart and a full re-run
def test_sigkill_of_one_rank_restarts_and_ends_like_an_uninterrupted_run(pydoc_blocks, tmp_path):
    extra = ["--train.max_steps=24", "--train.save_every=5"]
    ref = torchrun(pydoc_blocks, tmp_path / "ref", *extra)
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]

    run_dir = tmp_path / "killed"
    proc = torchrun(pydoc_blocks, run_dir, *extra, restarts=1)
    deadline = time.time() + 300
    while last_step(run_dir) < 12:  # past the step-10 checkpoint, before the next
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.poll() else "slow"
        time.sleep(0.05)
    victim = next(w for w in workers(proc) if w.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    killed_at = last_step(run_dir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out and "step-10" in out  # the newest complete checkpoint, found by itself
    assert killed_at < 24

    a = load_file(str(run_dir / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "export" / "model.safetensors"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    for rank in (0, 1):
        got, want = block_order(run_dir, rank), block_order(tmp_path / "ref", rank)
        assert got == want  # no block skipped or seen twice relative to the uninterrupted order
    # The steps between the checkpoint and the kill ran twice; the log shows them twice, in order.
    raw = [int(line.split()[0]) for line in (run_dir / "block_ids-rank0.txt").read_text().splitlines()]
    assert raw[:10] == list(range(1, 11)) and raw.count(11) == 2


@pytest.mark.extended
def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(pydoc_blocks, tmp_path):
    run_dir = tmp_path / "ck"
    extra = ["--train.max_steps=40", "--train.save_every=2", "--train.keep_last=3"]
    proc = torchrun(pydoc_blocks, run_dir, *extra)
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 300
    partial = None
    while partial is None:  # kill the job while a checkpoint folder is being written
        assert proc.poll() is None and time.time() < deadline, "no checkpoint write caught"
        tmp = [p for p in ckpts.glob(".tmp-step-*")] if ckpts.exists() else []
        if tmp and any((p / "COMPLETE").exists() for p in ckpts.glob("step-*")):
            partial = tmp[0]
            for w in [*workers(proc), psutil.Process(proc.pid)]:
                w.send_signal(signal.SIGKILL)
        time.sleep(0.002)
    proc.wait(timeout=60)
    complete = sorted(int(p.name[5:]) for p in ckpts.glob("step-*") if (p / "COMPLETE").exists())
    being_written = int(partial.name.rsplit("-", 1)[1])
    assert complete and complete[-1] < being_written
    # Relaunch, same command, resume=auto: from the previous complete checkpoint, no manual step.
    again = torchrun(pydoc_blocks, run_dir, *extra)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"resumed from {ckpts / f'step-{complete[-1]}'}" in out
    assert not list(ckpts.glob(".tmp-step-*"))  # the partial folder was cleaned
    assert (ckpts / "step-40" / "COMPLETE").exists()
