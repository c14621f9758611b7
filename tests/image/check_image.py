"""`make image-test`: the built image, run for real (not part of `make test`; ~15 min on 2 cores).

  1. `distclm --help` and `distclm doctor` in the image;
  2. the demo (`run --preset=demo`): perplexity falls;
  3. a 2-node ZeRO-2 job across two containers on a user-defined network (torchrun's c10d rendezvous by
     container name, one shared run volume): its per-step losses equal the same job as 2 local processes in
     one container (within 1e-5); one container killed mid-run, both relaunched: it resumes and ends on the
     uninterrupted run's final loss;
  4. launchers/k8s played as pods (podman only): the prepare Job, the Indexed Job (trains, checkpoints, is
     stopped, a second play resumes) and the PyTorchJob (master + worker train and checkpoint).

Prints one PASS/FAIL line per check, with its numbers; exit 1 when any failed. Settings (environment):
ENGINE (docker|podman, from docker/engine.sh), IMAGE (distclm:cpu), IMAGE_TEST_ONLY (comma list of
cli,demo,nodes,kube). Work files: .image/test/ (owned by uid 1000, the image's user).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from containers import Checks, engine, losses, run_logged, wait_for  # noqa: E402
from kube_run import check_kube  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / ".image" / "test"
IMAGE = os.environ.get("IMAGE", "distclm:cpu")
NET = "distclm-image-test"
STEPS, SAVE_EVERY = 12, 4
# A tiny model on the demo's data, ZeRO-2; fixed steps so the runs are comparable step by step.
TRAIN = ["train", "--data.dir=/shared/data/pydoc", "--model.name=gpt2-tiny", "--train.strategy=zero2",
         f"--train.max_steps={STEPS}", f"--train.save_every={SAVE_EVERY}", "--train.lr=1e-3",
         "--train.micro_batch_size=8", "--eval.at_end=false", "--train.dist_timeout_s=120", "--log.every_steps=1"]
# Rank 1's block reads take 0.3 s longer (tests/support/hooks, mounted): the steps are slow enough to kill
# a container between two checkpoints. Reads only: the losses are those of the plain job.
HOOKS = ["-v", f"{REPO}/tests/support/hooks:/hooks:ro", "-e", "PYTHONPATH=/hooks",
         "-e", "DISTCLM_TEST_SLOW_READS=1:0.3"]


def shared_mount() -> list[str]:
    return ["-v", f"{WORK}/shared:/shared"]


def check_cli(checks: Checks) -> None:
    out = run_logged([engine(), "run", "--rm", IMAGE, "--help"], timeout=120)
    checks.check("distclm --help", out.returncode == 0 and "usage" in out.stdout.lower(),
                 f"rc={out.returncode}, {len(out.stdout.splitlines())} lines")
    out = run_logged([engine(), "run", "--rm", IMAGE, "doctor"], timeout=300)
    rows = [ln.split() for ln in out.stdout.splitlines()]
    ops = [r[0] for r in rows if len(r) == 4 and r[1] == "yes"]  # op, prebuilt, JIT-buildable, JIT cache
    torch = next((r[1] for r in rows if len(r) > 1 and r[0] == "torch"), "?")
    checks.check("distclm doctor", out.returncode == 0 and "cpu_adam" in ops,
                 f"rc={out.returncode}, torch {torch}, ops built: {','.join(ops) or 'none'}")


def check_demo(checks: Checks) -> None:
    """The demo writes data/pydoc (reused by the training jobs below) and runs/demo under /workspace."""
    t0 = time.monotonic()
    out = run_logged([engine(), "run", "--rm", "-v", f"{WORK}/shared/data:/workspace/data",
                      "-v", f"{WORK}/demo-runs:/workspace/runs", IMAGE, "run", "--preset=demo"], timeout=1200)
    found = {}
    for line in (out.stdout + out.stderr).splitlines():
        for when in ("before", "after"):
            if line.startswith(f"== perplexity {when} training:"):
                found[when] = float(line.split(":")[1].split()[0])
    ok = out.returncode == 0 and {"before", "after"} <= set(found) and found["after"] < found["before"]
    ratio = found["before"] / found["after"] if ok else float("nan")
    checks.check("demo: perplexity falls", ok,
                 f"rc={out.returncode}, before {found.get('before')}, after {found.get('after')} "
                 f"({ratio:.1f}x), {time.monotonic() - t0:.0f} s")


def node_cmd(name: str, run: str, nnodes: int, nproc: int, extra: list[str] = ()) -> list[str]:
    """One node of the job: a container named `name` running launchers/torchrun.sh (the image's launcher)."""
    env = {"NNODES": str(nnodes), "NPROC_PER_NODE": str(nproc), "MAX_RESTARTS": "0",
           "GLOO_SOCKET_IFNAME": "eth0", "RDZV_TIMEOUT": "300", "OMP_NUM_THREADS": "1"}
    if nnodes > 1:
        env.update(RDZV_ENDPOINT="node0:29400", RDZV_ID=f"image-test-{run}")
    net = ["--network", NET, "--hostname", name] if nnodes > 1 else []
    flags = [f for k, v in env.items() for f in ("-e", f"{k}={v}")]
    return [engine(), "run", "-d", "--name", name, *net, *flags, *shared_mount(), *HOOKS, *extra,
            "--entrypoint", "/opt/distclm/launchers/torchrun.sh", IMAGE, *TRAIN, f"--run.dir=/shared/runs/{run}"]


def start_nodes(run: str, nnodes: int, nproc: int) -> list[str]:
    names = [f"node{i}" for i in range(nnodes)]
    for name in names:
        subprocess.run([engine(), "rm", "-f", name], capture_output=True)
        out = run_logged(node_cmd(name, run, nnodes, nproc), timeout=60)
        assert out.returncode == 0, out.stderr
    return names


def finish(names: list[str], timeout: float) -> list[int]:
    """Wait for the containers, keep their logs in .image/test/, remove them; -> their exit codes."""
    codes = []
    for name in names:
        out = subprocess.run([engine(), "wait", name], capture_output=True, text=True, timeout=timeout)
        codes.append(int(out.stdout.strip() or -1))
        logs = subprocess.run([engine(), "logs", name], capture_output=True, text=True)
        with open(WORK / "logs.txt", "a") as f:
            f.write(f"==== {name} (exit {codes[-1]})\n{logs.stdout}{logs.stderr}")
        subprocess.run([engine(), "rm", "-f", name], capture_output=True)
    return codes


def killed_and_resumed(checks: Checks) -> None:
    """Both nodes start; once a checkpoint is complete, node1's container is killed (SIGKILL): node0's worker
    loses its peer and exits. Then both are relaunched with the same command and resume."""
    run = "two-node-killed"
    names = start_nodes(run, 2, 1)
    first = WORK / "shared" / "runs" / run / "checkpoints" / f"step-{SAVE_EVERY}" / "COMPLETE"
    seen = wait_for(first.exists, timeout=600)
    done = losses(WORK / "shared" / "runs" / run)
    subprocess.run([engine(), "kill", "node1"], capture_output=True)
    codes = finish(names, timeout=300)
    at_kill = max(done, default=0)
    checks.check("2 nodes: node1 killed mid-run", seen and at_kill < STEPS and codes[1] != 0,
                 f"killed after step {at_kill} of {STEPS} (checkpoint step-{SAVE_EVERY} complete: {seen}); "
                 f"exit codes node0 {codes[0]}, node1 {codes[1]}")
    codes = finish(start_nodes(run, 2, 1), timeout=900)
    resumed = losses(WORK / "shared" / "runs" / run)
    reference = losses(WORK / "shared" / "runs" / "two-node")
    final_diff = abs(resumed.get(STEPS, float("inf")) - reference.get(STEPS, float("nan")))
    worst = max((abs(resumed[s] - reference[s]) for s in reference if s in resumed), default=float("inf"))
    checks.check("2 nodes: relaunched, resumed to the uninterrupted final loss",
                 codes == [0, 0] and set(resumed) == set(reference) and final_diff <= 1e-5,
                 f"exit codes {codes}; final loss {resumed.get(STEPS)} vs {reference.get(STEPS)} "
                 f"(|diff| {final_diff:.2e}); max |diff| over {len(resumed)} steps {worst:.2e}")


def check_nodes(checks: Checks) -> None:
    subprocess.run([engine(), "network", "rm", "-f", NET], capture_output=True)
    run_logged([engine(), "network", "create", NET], timeout=60)
    t0 = time.monotonic()
    local = finish(start_nodes("local", 1, 2), timeout=900)
    t1 = time.monotonic()
    two = finish(start_nodes("two-node", 2, 1), timeout=900)
    t2 = time.monotonic()
    ref, got = losses(WORK / "shared" / "runs" / "local"), losses(WORK / "shared" / "runs" / "two-node")
    worst = max((abs(ref[s] - got[s]) for s in ref if s in got), default=float("inf"))
    checks.check("2 nodes (2 containers) vs 2 local processes (1 container): per-step losses",
                 local == [0] and two == [0, 0] and len(ref) == STEPS and set(ref) == set(got) and worst <= 1e-5,
                 f"exit codes {local} / {two}; {len(got)} steps, max |diff| {worst:.2e} (<= 1e-5); "
                 f"loss step 1 {got.get(1)} -> step {STEPS} {got.get(STEPS)}; {t1 - t0:.0f} s / {t2 - t1:.0f} s")
    killed_and_resumed(checks)
    subprocess.run([engine(), "network", "rm", "-f", NET], capture_output=True)


def main() -> int:
    only = set(filter(None, os.environ.get("IMAGE_TEST_ONLY", "cli,demo,nodes,kube").split(",")))
    shutil.rmtree(WORK, ignore_errors=True)
    for sub in ("shared/data", "shared/runs", "demo-runs", "k8s"):
        (WORK / sub).mkdir(parents=True)
    checks = Checks()
    t0 = time.monotonic()
    if "cli" in only:
        check_cli(checks)
    if "demo" in only or "nodes" in only:
        subprocess.run(["chown", "-R", "1000:1000", str(WORK)], check=True)  # the image runs as uid 1000
        check_demo(checks)  # also prepares the data the jobs train on
    if "nodes" in only:
        check_nodes(checks)
    if "kube" in only:
        check_kube(checks, REPO, WORK / "k8s", IMAGE)
    return checks.summary(time.monotonic() - t0)


if __name__ == "__main__":
    sys.exit(main())
