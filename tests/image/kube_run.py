"""`make image-test`, part 4: launchers/k8s played as the Pods Kubernetes would create (podman kube play).

The prepare Job tokenizes onto the shared claim; the Indexed Job's two pods train, checkpoint, are stopped
(SIGTERM, as an eviction does: distclm saves and exits 143) and a second play of the same pods resumes to
the end; the PyTorchJob's master and worker pods train and checkpoint; the TrainJob's two pods (Kubeflow Trainer
v2: its ClusterTrainingRuntime's pod, as JobSet creates it) are stopped and resumed as the Indexed Job's are.
The changes to the manifests are printed in three lists (kube_pods.py): what Kubernetes adds, where podman differs, the CPU scale-down.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import yaml
from containers import Checks, engine, losses, run_logged, wait_for
from kube_pods import Plan, for_podman, indexed_job_pods, job_pod, pytorchjob_pods, scale_down, trainjob_pods

NET = "distclm-k8s"
CLAIM = "distclm-shared"
STEPS, SAVE_EVERY = 12, 3
# A tiny random-init model for a short run (the manifests fine-tune distilgpt2 from the Hub on 8 GPUs a pod).
TRAIN_ARGS = ["--model.name=gpt2-tiny", f"--train.max_steps={STEPS}", f"--train.save_every={SAVE_EVERY}",
              "--train.lr=1e-3", "--train.global_batch_size=16", "--eval.at_end=false", "--log.every_steps=1"]


def documents(repo: Path, name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((repo / "launchers" / "k8s" / name).read_text()) if d]


def print_plan(checks: Checks, title: str, plan: Plan) -> None:
    checks.note(f"{title}: {len(plan.pods)} pods; changes to the manifest as shipped:")
    for kind, items in (("kubernetes adds", plan.kubernetes), ("podman differs", plan.podman),
                        ("CPU scale-down", plan.scale_down)):
        for item in items:
            checks.note(f"  [{kind}] {item}")


def play(plan: Plan, path: Path) -> list[str]:
    """podman kube play the pods on the test network; -> their containers' names (<pod>-<container>)."""
    path.write_text(yaml.safe_dump_all(plan.pods, sort_keys=False))
    out = run_logged([engine(), "kube", "play", "--network", NET, str(path)], timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return [f"{p['metadata']['name']}-{c['name']}" for p in plan.pods for c in p["spec"]["containers"]]


def down(path: Path, containers: list[str], logs: Path) -> list[int]:
    """Exit codes of the containers (waiting for them), their logs kept, then `podman kube down`."""
    codes = []
    for name in containers:
        out = subprocess.run([engine(), "wait", name], capture_output=True, text=True, timeout=1800)
        codes.append(int(out.stdout.strip() or -1))
        text = subprocess.run([engine(), "logs", name], capture_output=True, text=True)
        with open(logs, "a") as f:
            f.write(f"==== {name} (exit {codes[-1]})\n{text.stdout}{text.stderr}")
    subprocess.run([engine(), "kube", "down", str(path)], capture_output=True, timeout=300)
    return codes


def setup(work: Path) -> Path:
    """The claim: a podman volume bound to a host folder owned by the image's uid (fsGroup on a cluster)."""
    shared = work / "shared"
    shutil.rmtree(shared, ignore_errors=True)
    shared.mkdir(parents=True)
    shutil.chown(shared, 1000, 1000)
    for cmd in (["volume", "rm", "-f", CLAIM], ["network", "rm", "-f", NET]):
        subprocess.run([engine(), *cmd], capture_output=True)
    run_logged([engine(), "volume", "create", "--opt", "type=none", "--opt", "o=bind",
                "--opt", f"device={shared}", CLAIM], timeout=60)
    run_logged([engine(), "network", "create", NET], timeout=60)
    return shared


def prepare(checks: Checks, repo: Path, work: Path, image: str) -> bool:
    [job] = documents(repo, "prepare-job.yaml")
    # The preset reads ELI5 from the Hub, unreachable here: the embedded pydoc corpus, into the same folder.
    plan = scale_down(job_pod(job), image, ["--data.source=pydoc", "--data.text_field=text"])
    plan.scale_down.remove("NPROC_PER_NODE, PET_NPROC_PER_NODE, OMP_NUM_THREADS -> 1")
    print_plan(checks, "prepare-job.yaml", plan)
    codes = down(work / "prepare.yaml", play(plan, work / "prepare.yaml"), work / "logs.txt")
    made = (work / "shared" / "data" / "eli5" / "manifest.json").exists()
    return checks.check("k8s prepare Job (pod): data on the claim", codes == [0] and made,
                        f"exit {codes}, /shared/data/eli5/manifest.json {'written' if made else 'missing'}")


def indexed_job(checks: Checks, repo: Path, work: Path, image: str) -> None:
    docs = documents(repo, "indexed-job.yaml")
    [job] = [d for d in docs if d["kind"] == "Job"]
    services = [d["metadata"]["name"] for d in docs if d["kind"] == "Service"]
    plan = scale_down(for_podman(indexed_job_pods(job), services), image, TRAIN_ARGS)
    print_plan(checks, "indexed-job.yaml", plan)
    stop_and_resume(checks, "k8s Indexed Job", plan, work, work / "indexed.yaml")


def trainjob(checks: Checks, repo: Path, work: Path, image: str) -> None:
    [job], [runtime] = documents(repo, "trainjob.yaml"), documents(repo, "training-runtime.yaml")
    plan = scale_down(for_podman(trainjob_pods(job, runtime), [job["metadata"]["name"]]), image, TRAIN_ARGS)
    print_plan(checks, "trainjob.yaml + training-runtime.yaml", plan)
    shutil.rmtree(work / "shared" / "runs" / "eli5-distilgpt2", ignore_errors=True)  # the others' run dir
    stop_and_resume(checks, "k8s TrainJob (Trainer v2)", plan, work, work / "trainjob.yaml")


def stop_and_resume(checks: Checks, title: str, plan: Plan, work: Path, path: Path) -> None:
    """Two pods train and checkpoint, are stopped (SIGTERM, as an eviction), and a second play resumes to the end."""
    run = work / "shared" / "runs" / "eli5-distilgpt2"
    containers = play(plan, path)
    first = run / "checkpoints" / f"step-{SAVE_EVERY}" / "COMPLETE"
    seen = wait_for(first.exists, timeout=900)
    # An eviction: SIGTERM to every pod (podman pod stop, the pods' terminationGracePeriodSeconds to save).
    subprocess.run([engine(), "pod", "stop", "-t", "120", *[p["metadata"]["name"] for p in plan.pods]],
                   capture_output=True, timeout=300)
    codes, at_stop = down(path, containers, work / "logs.txt"), losses(run)
    checks.check(f"{title}: 2 pods train, checkpoint, stopped mid-run",
                 seen and 0 < max(at_stop, default=0) < STEPS and all(c >= 128 for c in codes),
                 f"stopped at step {max(at_stop, default=0)} of {STEPS}, exit codes {codes} (>= 128: retryable; "
                 "143 after SIGTERM, 137 killed at the end of the grace period)")
    t0 = time.monotonic()
    codes = down(path, play(plan, path), work / "logs.txt")
    after = losses(run)
    resumed_at = min((s for s in after if s > max(at_stop, default=0)), default=None)
    log = (work / "logs.txt").read_text()
    checks.check(f"{title}: a second play resumes to the end",
                 codes == [0, 0] and max(after, default=0) == STEPS and "resum" in log.lower(),
                 f"exit codes {codes}, steps {resumed_at}..{max(after, default=0)} after the restart, "
                 f"final loss {after.get(STEPS)}, {time.monotonic() - t0:.0f} s")


def pytorchjob(checks: Checks, repo: Path, work: Path, image: str) -> None:
    [job] = documents(repo, "pytorchjob.yaml")
    plan = scale_down(for_podman(pytorchjob_pods(job), []), image, TRAIN_ARGS)
    print_plan(checks, "pytorchjob.yaml", plan)
    run = work / "shared" / "runs" / "eli5-distilgpt2"
    shutil.rmtree(run, ignore_errors=True)  # the same run dir as the Indexed Job's
    t0 = time.monotonic()
    codes = down(work / "pytorchjob.yaml", play(plan, work / "pytorchjob.yaml"), work / "logs.txt")
    got = losses(run)
    ckpt = sorted(p.name for p in (run / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    checks.check("k8s PyTorchJob: master + worker pods train and checkpoint",
                 codes == [0, 0] and max(got, default=0) == STEPS and f"step-{STEPS}" in ckpt,
                 f"exit codes {codes}, {len(got)} steps, loss {got.get(1)} -> {got.get(STEPS)}, "
                 f"checkpoints {ckpt}, {time.monotonic() - t0:.0f} s")


def check_kube(checks: Checks, repo: Path, work: Path, image: str) -> None:
    if engine() != "podman":
        checks.note("SKIP k8s: pods are played with `podman kube play` (docker has none)")
        return
    setup(work)
    if prepare(checks, repo, work, image):
        indexed_job(checks, repo, work, image)
        pytorchjob(checks, repo, work, image)
        trainjob(checks, repo, work, image)
    subprocess.run([engine(), "network", "rm", "-f", NET], capture_output=True)
    subprocess.run([engine(), "volume", "rm", "-f", CLAIM], capture_output=True)
