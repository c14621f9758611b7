"""Two hosts (network namespaces + a veth pair), one launcher per host, gloo over the veth: the same ZeRO-2
run as 2 processes on one host, step for step, through launchers/torchrun.sh (c10d rendezvous, one node
starting 20 s late) and launchers/deepspeed.sh (--no_ssh, node ranks given)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.multinode.netns_hosts import TwoHosts
from tests.support.cli import run_cli
from tests.support.env import REPO, child_env
from tests.support.runs import read_metrics

pytestmark = pytest.mark.slow

STEPS = 3
ARGS = ["--model.name=gpt2-tiny", "--train.strategy=zero2", f"--train.max_steps={STEPS}", "--train.micro_batch_size=4",
        "--train.lr=1e-3", "--train.seed=3", "--log.every_steps=1", "--eval.batch_size=4",
        "--train.dist_timeout_s=120"]
LATE_S = 20.0


@pytest.fixture(scope="module")
def hosts():
    reason = TwoHosts.unavailable()
    if reason:
        pytest.skip(f"two hosts need network namespaces: {reason}")
    with TwoHosts() as made:
        yield made


def outcome(run_dir: Path) -> tuple[list[float], dict]:
    train = read_metrics(run_dir, "train")
    assert sorted(train) == list(range(1, STEPS + 1))
    evals = read_metrics(run_dir, "eval")
    return [train[s]["loss"] for s in range(1, STEPS + 1)], evals[STEPS]


@pytest.fixture(scope="module")
def one_host(blocks, tmp_path_factory):
    """The reference: the same job as 2 processes on one host (torchrun, loopback)."""
    run_dir = tmp_path_factory.mktemp("one-host") / "run"
    run_cli("train", *[f"--data.dir={blocks}", f"--run.dir={run_dir}", *ARGS], nproc=2, check=True)
    return outcome(run_dir)


def host_env(hosts: TwoHosts, i: int, **extra: str) -> dict:
    env = child_env()
    env.update(PYTHON=sys.executable, GLOO_SOCKET_IFNAME=hosts.ifname[i], **extra)
    return env


def run_on_both(hosts: TwoHosts, cmds: list[list[str]], envs: list[dict], logs: Path, delay_b: float = 0.0,
                timeout: float = 240) -> list[str]:
    """Start cmds[0] on host A, cmds[1] on host B (`delay_b` s later); wait for both; -> their logs."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = [hosts.popen(0, cmds[0], envs[0], REPO, logs / "a.log")]
    try:
        time.sleep(delay_b)
        procs.append(hosts.popen(1, cmds[1], envs[1], REPO, logs / "b.log"))
        deadline = time.monotonic() + timeout
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = [(logs / f"{n}.log").read_text(errors="replace") for n in "ab"]
    assert codes == [0, 0], f"exit codes {codes}\n--- host A ---\n{out[0][-5000:]}\n--- host B ---\n{out[1][-5000:]}"
    return out


def assert_same_run(got, want) -> None:
    (losses, ev), (ref_losses, ref_ev) = got, want
    assert ref_losses[-1] < ref_losses[0]  # the reference learned: not two flat lines
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-4)
    assert ev["eval_tokens"] == ref_ev["eval_tokens"]
    np.testing.assert_allclose(ev["eval_loss"], ref_ev["eval_loss"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(ev["eval_perplexity"], ref_ev["eval_perplexity"], rtol=1e-4)


def test_torchrun_c10d_two_hosts_match_one_host_with_a_node_20s_late(hosts, blocks, one_host, tmp_path):
    run_dir = tmp_path / "run"
    port = 29400
    cmd = [str(REPO / "launchers" / "torchrun.sh"), "train", f"--data.dir={blocks}", f"--run.dir={run_dir}", *ARGS]
    envs = [host_env(hosts, i, NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"{hosts.addr[0]}:{port}",
                     RDZV_ID=f"two-hosts-{os.getpid()}", RDZV_CONF=f"is_host={int(i == 0)}", LOCAL_ADDR=hosts.addr[i],
                     MAX_RESTARTS="0", RDZV_TIMEOUT="120") for i in (0, 1)]
    t0 = time.monotonic()
    logs = run_on_both(hosts, [cmd, cmd], envs, tmp_path / "logs", delay_b=LATE_S)
    assert time.monotonic() - t0 > LATE_S
    assert_same_run(outcome(run_dir), one_host)
    # Rank 0 printed the start-up checks: two nodes, each under its own hostname, one shared run dir.
    assert f"world 2 = 2 node(s) x 1 process(es) per node ({hosts.hostname[0]}: rank 0; {hosts.hostname[1]}: rank 1)" \
        in logs[0]
    assert "shared" in logs[0]


@pytest.mark.extended  # CI: the torchrun (c10d) pair of hosts above
def test_deepspeed_launcher_no_ssh_two_hosts_match_one_host(hosts, blocks, one_host, tmp_path):
    run_dir = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"{hosts.addr[0]} slots=1\n{hosts.addr[1]} slots=1\n")
    cmd = [str(REPO / "launchers" / "deepspeed.sh"), "train", f"--data.dir={blocks}", f"--run.dir={run_dir}", *ARGS]
    envs = [host_env(hosts, i, HOSTFILE=str(hostfile), MASTER_ADDR=hosts.addr[0], MASTER_PORT="29401",
                     NO_SSH="1", NODE_RANK=str(i)) for i in (0, 1)]
    run_on_both(hosts, [cmd, cmd], envs, tmp_path / "logs")
    assert_same_run(outcome(run_dir), one_host)
    assert (run_dir / "ds_config.json").exists()


def test_doctor_all_reduces_across_the_two_hosts(hosts, tmp_path):
    cmd = [str(REPO / "launchers" / "torchrun.sh"), "doctor", "--train.dist_timeout_s=60"]
    envs = [host_env(hosts, i, NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"{hosts.addr[0]}:29402",
                     RDZV_ID=f"doctor-{os.getpid()}", RDZV_CONF=f"is_host={int(i == 0)}", LOCAL_ADDR=hosts.addr[i],
                     MAX_RESTARTS="0", RDZV_TIMEOUT="60") for i in (0, 1)]
    logs = run_on_both(hosts, [cmd, cmd], envs, tmp_path / "logs")
    assert "all-reduce over 2 ranks ok" in logs[0]
    assert f"{hosts.hostname[0]}: rank 0; {hosts.hostname[1]}: rank 1" in logs[0]
    assert hosts.ifname[0] in logs[0]  # the launcher environment it reports
    assert "deepspeed ops" in logs[0] and "resolved config" in logs[0]


def test_the_namespaces_are_private(hosts):
    # The test's addresses exist only inside its namespaces: nothing of them on the machine itself.
    shown = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert hosts.addr[0] not in shown and hosts.addr[1] not in shown
