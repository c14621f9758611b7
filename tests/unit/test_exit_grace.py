"""dist.arm_grace (issue 28, rule 7): past the grace a process ends with the code it was given and every stack
printed, even while its main thread holds the GIL in C forever (where a Python timer thread could never run)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support.env import REPO, child_env

BLOCKED = """
import ctypes, sys
from distclm import dist
dist.own_process()
dist.arm_grace(int(sys.argv[1]), 1.0)
print("armed", flush=True)
ctypes.PyDLL(None).sleep(60)  # the GIL held across the call
"""


def run_blocked(code: int) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", BLOCKED, str(code)], env=child_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    return proc, time.monotonic() - t0


@pytest.mark.slow  # real processes or many rounds: make test, not test-fast
def test_a_process_blocked_holding_the_gil_ends_with_its_own_code_and_stacks():
    for code in (0, 3):
        proc, elapsed = run_blocked(code)
        assert proc.returncode == code, proc.stderr
        assert proc.stdout == "armed\n"
        assert "Timeout (0:00:01)!" in proc.stderr and 'File "<string>", line 7' in proc.stderr, proc.stderr
        assert elapsed < 15


@pytest.mark.slow  # real processes or many rounds: make test, not test-fast
def test_a_disarmed_grace_ends_nothing_and_main_run_elsewhere_arms_none():
    script = ("import time\nfrom distclm import dist\ndist.arm_grace(5, 0.5)\ntime.sleep(2)\n"  # not owned: nothing
              "dist.own_process()\nwith dist.grace(5, 0.5):\n    pass\ntime.sleep(2)\nprint('alive')\n")
    proc = subprocess.run([sys.executable, "-c", script], env=child_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=30)
    assert (proc.returncode, proc.stdout) == (0, "alive\n"), proc.stderr


def test_pickles_are_found_by_their_opcodes_without_running(tmp_path):
    import torch

    from distclm.safe_load import DEEPSPEED_TYPES, FORCE, FORCE_NOT, find_unsafe, forbid_code_from_files
    from tests.support.payload import plant

    marker = tmp_path / "marker"
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "a.pt")
    assert find_unsafe(tmp_path) is None
    bad = plant(tmp_path / "b.pt", marker)
    assert find_unsafe(tmp_path) == (bad, ["builtins.exec"])
    bare = plant(tmp_path / "a.pt", marker, bare=True)
    assert find_unsafe(bare) == (bare, ["a bare pickle"])
    assert not marker.exists()
    assert len(DEEPSPEED_TYPES) == 4
    import os

    saved = {k: os.environ.get(k) for k in (FORCE, FORCE_NOT)}
    try:
        os.environ[FORCE_NOT] = "1"
        forbid_code_from_files()
        assert os.environ[FORCE] == "1" and FORCE_NOT not in os.environ
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_main_loads_weights_only_and_gives_the_environment_back(monkeypatch):
    import os

    from distclm import cli
    from distclm.safe_load import FORCE

    seen = []
    monkeypatch.delenv(FORCE, raising=False)
    monkeypatch.setattr(cli, "run_command", lambda argv: seen.append(os.environ.get(FORCE)) or 0)
    assert cli.main(["doctor"]) == 0
    assert seen == ["1"] and FORCE not in os.environ
