"""Start-up checks on real processes: an unreachable rendezvous is one line naming host:port and timeout
(not a hang); a run dir that is not shared fails fast naming the node; `doctor` names the rank and host
whose all-reduce fails. Ranks are given by hand (tests/support/ranks.py), each in its own conditions."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.support.cli import free_port
from tests.support.env import REPO
from tests.support.ranks import as_host, can_unshare, rank_env, run_ranks

pytestmark = pytest.mark.slow
DISTCLM = [sys.executable, "-m", "distclm.cli"]


def test_unreachable_rendezvous_is_one_line_naming_host_port_and_timeout(blocks, tmp_path):
    port = free_port()  # nothing listens there: rank 0 never started
    t0 = time.monotonic()
    proc = subprocess.run([*DISTCLM, "train", f"--data.dir={blocks}", "--model.name=gpt2-tiny",
                           f"--run.dir={tmp_path / 'r'}", "--train.dist_timeout_s=3"],
                          env=rank_env(1, 2, port), cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert last.startswith("distclm: error: rank 1 of 2 on ")
    assert f"could not reach the rendezvous at 127.0.0.1:{port}" in last and "within 3s" in last
    assert elapsed < 60  # the timeout, not a hang


def test_run_dir_that_is_not_shared_fails_fast_naming_the_node(blocks, tmp_path):
    reason = can_unshare()
    if reason:
        pytest.skip(f"a node-local run dir needs a private mount: {reason}")
    runs = tmp_path / "runs"
    runs.mkdir()
    port = free_port()
    args = ["train", f"--data.dir={blocks}", "--model.name=gpt2-tiny", f"--run.dir={runs / 'r'}",
            "--train.dist_timeout_s=60"]
    cmds = [as_host("node-a", [*DISTCLM, *args]), as_host("node-b", [*DISTCLM, *args], hide=runs)]
    t0 = time.monotonic()
    done = run_ranks(cmds, [rank_env(0, 2, port), rank_env(1, 2, port)])
    assert [p.returncode for p in done] == [2, 2], [p.stderr[-2000:] for p in done]
    for p in done:  # every rank stops with the same message, naming the node whose copy differs
        last = p.stderr.strip().splitlines()[-1]
        assert f"the run dir {runs / 'r'} is not the same folder on every node" in last
        assert "rank(s) 1 on node 1 on node-b" in last
    assert time.monotonic() - t0 < 90
    assert not (runs / "r" / "metrics.jsonl").exists()


def test_doctor_names_the_rank_and_host_whose_all_reduce_fails(tmp_path):
    port = free_port()
    hosts = ["node-a", "node-b"] if can_unshare() is None else [os.uname().nodename] * 2
    wrap = (lambda h, c: as_host(h, c)) if can_unshare() is None else (lambda h, c: c)
    cmd = [*DISTCLM, "doctor", "--train.dist_timeout_s=6"]
    envs = [rank_env(0, 2, port), rank_env(1, 2, port, GLOO_SOCKET_IFNAME="nosuchnic0")]
    done = run_ranks([wrap(hosts[0], cmd), wrap(hosts[1], cmd)], envs)
    assert [p.returncode for p in done] == [1, 1], [p.stdout[-2000:] + p.stderr[-2000:] for p in done]
    report = done[0].stdout
    assert "all-reduce over 2 ranks FAILED (rendezvous 127.0.0.1" in report and "timeout 6s" in report
    assert f"rank 1 (node 1 on {hosts[1]}) failed:" in report and "nosuchnic0" in report
    assert f"doctor: rank 1 (node 1 on {hosts[1]}):" in done[1].stderr  # the failing rank says it too
    assert "versions" in report and "launcher environment" in report
