"""A hung rank named: stopped for good (SIGSTOP) or alive but stuck in Python, the ranks still alive name it with its
host, phase and step, dump their stacks to RUN/hang-rank{R}.txt and exit 75 (so does launchers/torchrun.sh, where
torchrun alone exits 1); a slow step on every rank alike is no hang. Real gloo processes under torchrun; stopped
processes are continued and killed in teardown."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import psutil
import pytest

from distclm.watchdog import HANG_EXIT
from tests.support.runs import CKPT, TWO
from tests.support.cli import Lines, run_cli, start_cli
from tests.support.env import REPO, child_env
from tests.support.runs import block_ids, read_metrics
from tests.support.stopper import kill_workers, rank_pid, release

HANG = re.compile(r"distclm: hang: not arrived: rank (\d+) on (\S+) \(in (.+?) at step (\d+), (.+?)\); "
                  r"waiting for it: 1 rank \(longest: rank (\d+), (\d+) s in (.+?) at step (\d+)\)")


def hung_run(args, hooks: dict, timeout_s: int, script: bool = False):
    """torchrun with 2 processes (`script`: through launchers/torchrun.sh, no restart), the hook that makes rank 1
    hang -> (launcher, its lines, rank 0's process)."""
    args = [*args, f"--train.hang_timeout_s={timeout_s}", "--log.interval_s=0"]
    if script:
        env = child_env(hooks=hooks, NPROC_PER_NODE="2", MAX_RESTARTS="0", PYTHON=sys.executable)
        proc = subprocess.Popen(["bash", str(REPO / "launchers" / "torchrun.sh"), "train", *map(str, args)], env=env,
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    else:
        proc = start_cli("train", *args, nproc=2, env=child_env(hooks=hooks))
    return proc, Lines(proc), psutil.Process(rank_pid(proc.pid, 0))


def finish(proc, lines: Lines, survivor) -> str:
    """Rank 0 (`survivor`) exits by itself (75); then the hung rank is killed, as the launcher or an operator would
    (torchrun's own SIGTERM would wait 30 s on a stopped process) -> everything the run printed."""
    survivor.wait(timeout=60)  # its exit code: in the launcher's summary
    kill_workers(proc.pid)
    proc.wait(timeout=60)
    return lines.text()


def test_a_stopped_rank_is_named_with_its_host_and_phase_and_the_last_checkpoint_resumes_exactly(
        shared, pydoc_blocks, tmp_path):
    ref = shared.get("ckpt-ddp-2proc")  # the same command, uninterrupted (tests/conftest.py)
    run = tmp_path / "hung"
    args = [f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", f"--run.dir={run}", "--log.every_steps=1",
            *CKPT, *TWO]
    proc, lines, rank0 = hung_run(args, {"DISTCLM_TEST_SIGSTOP_AT_STEP": "1:13"}, 20)
    try:
        t_last, _ = lines.wait_for(r"^step 12/20", 300)  # rank 1 stops itself at the start of step 13
        t_named, m = lines.wait_for(r"distclm: hang:", 120)
        out = finish(proc, lines, rank0)
    finally:
        release(proc)
    m = HANG.search(out)
    assert m, out[-3000:]
    print(f"hang run: {time.time() - t_named:.1f} s from the line to the launcher's exit")
    rank, host, phase, step, state = m.group(1), m.group(2), m.group(3), int(m.group(4)), m.group(5)
    print(f"named {t_named - t_last:.1f} s after step 12's line: {m.group(0)}")
    assert (rank, host) == ("1", socket.gethostname()) and state.startswith("silent for")
    assert phase and step in (11, 12, 13)  # its last heartbeat (one a second): the end of step 12 or about
    assert m.group(6) == "0" and int(m.group(7)) >= 20 and m.group(9) == "13"  # rank 0 waited at step 13
    assert t_named - t_last < 60
    assert out.count("distclm: hang:") == 1  # ONE line
    assert re.search(rf"exitcode\s*:\s*{HANG_EXIT}", out), out[-3000:]  # the launcher's root cause: rank 0, 75
    stack = (run / "hang-rank0.txt").read_text()
    assert "in train_step" in stack and "Thread" in stack and m.group(0) in stack
    assert not (run / "hang-rank1.txt").exists()  # a stopped process writes nothing
    # The newest complete checkpoint is step 10; the same command resumes from it and trains as the straight run.
    t = time.time()
    resumed = run_cli("train", *args, nproc=2, check=True)
    print(f"resume: {time.time() - t:.1f} s")
    assert f"resumed from {run / 'checkpoints' / 'step-10'} at step 10" in resumed.out
    a, b = read_metrics(ref), read_metrics(run)
    assert max(abs(a[s]["loss"] - b[s]["loss"]) for s in range(11, 21)) <= 1e-6
    assert all(block_ids(run, r)[s] == block_ids(ref, r)[s] for r in (0, 1) for s in range(11, 21))


def test_a_rank_stuck_in_python_is_named_with_its_phase_and_its_stack_shows_the_hook(pydoc_blocks, tmp_path):
    run = tmp_path / "stuck"
    args = [f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", f"--run.dir={run}", "--train.max_steps=20",
            "--train.micro_batch_size=4"]
    proc, lines, _ = hung_run(args, {"DISTCLM_TEST_BLOCK_AT_STEP": "1:5"}, 10, script=True)
    try:
        t_last, _ = lines.wait_for(r"^step 4/20", 300)
        t_named, _ = lines.wait_for(r"distclm: hang:", 60)
        code = proc.wait(timeout=90)  # both ranks alive: both exit by themselves
        out = lines.text()
    finally:
        release(proc)
    assert code == HANG_EXIT, out[-3000:]  # the launcher passes the workers' code on (torchrun alone exits 1)
    m = HANG.search(out)
    assert m and (m.group(1), m.group(3), m.group(4)) == ("1", "backward", "5"), out[-3000:]
    assert m.group(5).startswith("alive") and t_named - t_last < 40
    print(f"named {t_named - t_last:.1f} s after step 4's line: {m.group(0)}")
    for r in (0, 1):  # both alive: both stacks on disk; the stuck one shows the hook it is blocked in
        assert m.group(0) in (run / f"hang-rank{r}.txt").read_text()
    assert "in blocked_in_a_backward_hook" in (run / "hang-rank1.txt").read_text()


@pytest.mark.extended  # CI: the stopped rank above
def test_a_step_an_eval_or_a_save_slower_than_the_timeout_is_no_hang(pydoc_blocks, tmp_path):
    """Every rank 8 s in each forward and each eval, rank 0 alone 8 s in the checkpoint save while rank 1 waits
    for it (slow storage): a 5 s timeout, no alarm."""
    run = tmp_path / "slow-all"
    hooks = {"DISTCLM_TEST_SLOW_FORWARD": "all:8", "DISTCLM_TEST_SLOW_EVAL": "all:8", "DISTCLM_TEST_SLOW_SAVE": "0:8"}
    r = run_cli("train", f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", f"--run.dir={run}",
                "--train.max_steps=2", "--train.micro_batch_size=4", "--eval.max_blocks=4", "--train.save_every=2",
                "--train.hang_timeout_s=5", nproc=2, env=child_env(hooks=hooks))
    assert r.code == 0 and "hang" not in r.out + r.err, (r.out + r.err)[-3000:]
    assert read_metrics(run)[2]["elapsed_s"] > 2 * 8 and 2 in read_metrics(run, "eval")
    assert (run / "checkpoints" / "step-2").is_dir()
    assert not list(run.glob("hang-rank*.txt"))
