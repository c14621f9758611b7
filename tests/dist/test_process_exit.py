"""How a rank ends (distclm.dist.end_process): once it formed a process group it waits for its threads, runs its
atexit handlers, flushes its output and leaves with os._exit, skipping the interpreter's teardown, where torch's
C++ threads race it for the GIL (pytorch/pytorch#190489): a finished rank, and so its pod, must not stay alive.
The teardown is made to hang for good by a test hook; real gloo processes, started by hand as a launcher would."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cli import free_port
from tests.support.env import REPO, child_env
from tests.support.ranks import rank_env, run_ranks

# Both ways a launcher starts a rank: the module (torchrun.sh, deepspeed.sh) and the console script.
COMMANDS = [[sys.executable, "-m", "distclm.cli"], [str(Path(sys.executable).parent / "distclm")]]


def teardown_hangs(marker: Path) -> dict:
    return {"DISTCLM_TEST_TEARDOWN_HANG": str(marker)}


def test_the_hook_does_hang_a_plain_interpreter_exit(tmp_path):
    """Without it the test below proves nothing: a plain process under the hook never ends."""
    marker = tmp_path / "atexit.txt"
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", "print('done')"], env=child_env(teardown_hangs(marker)), cwd=REPO,
                       capture_output=True, timeout=5)
    assert marker.read_text() == "atexit ran\n"


@pytest.mark.parametrize("bad_nic", [False, True], ids=["healthy", "all-reduce-fails"])
def test_ranks_end_with_their_code_and_output_when_the_teardown_would_hang(tmp_path, bad_nic):
    if not Path(COMMANDS[1][0]).exists():
        pytest.skip(f"no console script at {COMMANDS[1][0]} (the package is not installed in this interpreter)")
    port = free_port()
    markers = [tmp_path / f"atexit-rank{r}.txt" for r in range(2)]
    nic = {"GLOO_SOCKET_IFNAME": "nosuchnic0"} if bad_nic else {}
    envs = [rank_env(0, 2, port, teardown_hangs(markers[0])),
            rank_env(1, 2, port, teardown_hangs(markers[1]), **nic)]
    cmds = [[*COMMANDS[r], "doctor", "--train.dist_timeout_s=6"] for r in range(2)]
    t0 = time.monotonic()
    done = run_ranks(cmds, envs, timeout=90)
    elapsed = time.monotonic() - t0
    want = 1 if bad_nic else 0
    assert [p.returncode for p in done] == [want, want], [p.stdout[-1500:] + p.stderr[-1500:] for p in done]
    # The output written just before os._exit is all there (stdout is a pipe: block-buffered, flushed by hand).
    verdict = "all-reduce over 2 ranks FAILED" if bad_nic else "all-reduce over 2 ranks ok in"
    assert verdict in done[0].stdout
    assert [m.read_text() for m in markers] == ["atexit ran\n"] * 2  # atexit handlers ran, before the exit
    assert elapsed < 60  # not the 90 s timeout: no rank waited on its teardown


def release_hangs(grace_s: int) -> dict:
    return {"DISTCLM_TEST_RELEASE_HANG": f"1:{grace_s}"}


@pytest.mark.parametrize("entry", [0, 1], ids=["python-m", "console-script"])
@pytest.mark.parametrize("case", ["done", "user-error"])
def test_a_rank_whose_release_blocks_ends_within_the_grace_with_the_runs_code(pydoc_blocks, tmp_path, entry, case):
    """Rule 7 of issue 28: rank 1's release of its group blocks for good, in C, holding the GIL (the shape of the
    deadlock in ~ProcessGroupGloo); it still ends within the grace, every stack printed, with the code of its run:
    0 after a finished training, 2 after a user error (here: rank 1 claims another torch)."""
    if not Path(COMMANDS[entry][0]).exists():
        pytest.skip(f"no console script at {COMMANDS[entry][0]} (the package is not installed in this interpreter)")
    grace, port = 5, free_port()
    hooks = release_hangs(grace) | ({"DISTCLM_TEST_FAKE_VERSION": "1:torch=9.9.9"} if case == "user-error" else {})
    envs = [rank_env(r, 2, port, hooks) for r in range(2)]
    cmd = [*COMMANDS[entry], "train", f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny",
           f"--run.dir={tmp_path / 'r'}", "--train.max_steps=2", "--train.micro_batch_size=4", "--eval.max_blocks=8"]
    done = run_ranks([cmd, cmd], envs, timeout=240)
    want = 0 if case == "done" else 2
    assert [p.returncode for p in done] == [want, want], [p.stderr[-2000:] for p in done]
    stacks = done[1].stderr
    assert f"Timeout (0:00:0{grace})!" in stacks and "most recent call first" in stacks, stacks[-3000:]
    assert "blocked_in_c_holding_the_gil" in stacks  # the dump shows where it was stuck
    assert "Timeout" not in done[0].stderr  # rank 0 released normally
    if case == "done":
        assert (tmp_path / "r" / "summary.json").exists()
