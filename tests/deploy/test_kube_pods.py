"""tests/image/kube_pods.py: the Pods that `make image-test` plays are the manifests' pod templates as shipped,
plus only what the Job controller / training operator adds, where podman differs, and the CPU scale-down,
each change said in words. Runs without podman (the playing itself is `make image-test`)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

from distclm.cli import parse

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "image"))
from kube_pods import for_podman, indexed_job_pods, job_pod, pytorchjob_pods, scale_down, trainjob_pods  # noqa: E402

K8S = REPO / "launchers" / "k8s"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def validate_pod(pod: dict) -> None:
    from kubernetes import client

    client.V1Pod.model_validate(pod)  # strict: an unknown or misplaced field fails


def test_indexed_job_pods_are_the_template_plus_what_the_job_controller_adds():
    [job] = [d for d in docs("indexed-job.yaml") if d["kind"] == "Job"]
    template = job["spec"]["template"]
    plan = indexed_job_pods(job)
    assert len(plan.pods) == job["spec"]["completions"] == 2
    for i, pod in enumerate(plan.pods):
        validate_pod(pod)
        assert pod["metadata"]["name"] == pod["spec"]["hostname"] == f"distclm-eli5-{i}"
        assert pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == str(i)
        [c], [tc] = pod["spec"]["containers"], template["spec"]["containers"]
        assert env(c) == {**env(tc), "JOB_COMPLETION_INDEX": str(i)}
        # Nothing else changed: the same image, command, args, volumes, security context.
        spec = copy.deepcopy(pod["spec"])
        spec.pop("hostname")
        spec["containers"][0]["env"] = tc["env"]
        assert spec == template["spec"]
    assert any("JOB_COMPLETION_INDEX" in s for s in plan.kubernetes)


def test_for_podman_resolves_the_headless_service_name_to_the_pod_and_drops_host_ports():
    docs_ = docs("indexed-job.yaml")
    [job] = [d for d in docs_ if d["kind"] == "Job"]
    [svc] = [d["metadata"]["name"] for d in docs_ if d["kind"] == "Service"]
    plan = for_podman(indexed_job_pods(job), [svc])
    pods = plan.pods
    endpoint = env(pods[1]["spec"]["containers"][0])["RDZV_ENDPOINT"]
    # The rendezvous host is pod 0, by the name podman's DNS knows, on the manifest's port.
    assert endpoint == f"{pods[0]['spec']['hostname']}:29400"
    assert all("ports" not in c for p in pods for c in p["spec"]["containers"])
    assert len(plan.podman) == 3 and not plan.scale_down


def test_pytorchjob_pods_get_the_operators_env_consistent_with_the_manifests_own():
    [job] = docs("pytorchjob.yaml")
    plan = pytorchjob_pods(job)
    names = [p["metadata"]["name"] for p in plan.pods]
    assert names == ["distclm-eli5-master-0", "distclm-eli5-worker-0"]
    for rank, pod in enumerate(plan.pods):
        validate_pod(pod)
        e = env(pod["spec"]["containers"][0])
        assert e["RANK"] == str(rank) and e["MASTER_ADDR"] == names[0]
        # torchrun.sh reads NNODES..., then PET_*: both say the same (the manifest's copy wins where set).
        assert e["PET_NNODES"] == e["NNODES"] and e["PET_RDZV_ENDPOINT"] == e["RDZV_ENDPOINT"]
        assert e["PET_RDZV_ID"] == e["RDZV_ID"] and e["PET_MAX_RESTARTS"] == e["MAX_RESTARTS"]
        assert e["RDZV_ENDPOINT"].split(":")[0] == names[0]  # the master pod's name: resolvable as it is
        assert pod["spec"]["restartPolicy"] == "Never"  # ExitCode: the operator restarts, not the kubelet


def test_trainjob_pods_are_the_runtime_template_with_the_trainer_fields_and_the_torch_plugins_env():
    [job], [runtime] = docs("trainjob.yaml"), docs("training-runtime.yaml")
    plan = trainjob_pods(job, runtime)
    trainer = job["spec"]["trainer"]
    names = [p["metadata"]["name"] for p in plan.pods]
    assert names == ["distclm-eli5-node-0-0", "distclm-eli5-node-0-1"]  # numNodes pods, JobSet's names
    [node] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    template = node["template"]["spec"]["template"]
    for i, pod in enumerate(plan.pods):
        validate_pod(pod)
        assert pod["spec"]["hostname"] == names[i] and pod["spec"]["subdomain"] == "distclm-eli5"
        [c], [tc] = pod["spec"]["containers"], template["spec"]["containers"]
        assert c["args"] == trainer["args"] and c["command"] == tc["command"] and c["image"] == tc["image"]
        assert c["resources"] == trainer["resourcesPerNode"]
        e = env(c)
        assert e["PET_NODE_RANK"] == e["JOB_COMPLETION_INDEX"] == str(i)
        assert e["PET_NNODES"] == e["NNODES"] == str(trainer["numNodes"])
        assert e["PET_NPROC_PER_NODE"] == e["NPROC_PER_NODE"]
        # The rendezvous: pod 0 by its JobSet DNS name, which is also where the torch plugin puts the master
        assert e["RDZV_ENDPOINT"] == f"{e['PET_MASTER_ADDR']}:29400" and e["PET_MASTER_ADDR"].startswith(names[0])
        # Nothing else changed: volumes, security context, restart policy, grace period are the runtime's.
        for key in ("volumes", "securityContext", "restartPolicy", "terminationGracePeriodSeconds"):
            assert pod["spec"][key] == template["spec"][key], key
    played = for_podman(plan, ["distclm-eli5"])
    e = env(played.pods[1]["spec"]["containers"][0])
    assert e["RDZV_ENDPOINT"] == "distclm-eli5-node-0-0:29400" and e["PET_MASTER_ADDR"] == "distclm-eli5-node-0-0"
    assert not any("valueFrom" in x for p in played.pods for x in p["spec"]["containers"][0]["env"])
    assert any("Secrets removed" in s for s in played.podman)


def test_scale_down_appends_flags_that_win_over_the_manifests_and_keeps_its_paths():
    [job] = [d for d in docs("indexed-job.yaml") if d["kind"] == "Job"]
    shipped = job["spec"]["template"]["spec"]["containers"][0]["args"]
    plan = scale_down(indexed_job_pods(job), "distclm:cpu", ["--model.name=gpt2-tiny", "--train.max_steps=4"])
    c = plan.pods[0]["spec"]["containers"][0]
    assert c["image"] == "distclm:cpu" and "resources" not in c and env(c)["NPROC_PER_NODE"] == "1"
    assert c["args"][:len(shipped)] == shipped
    cfg = parse(c["args"]).cfg
    assert cfg.model.name == "gpt2-tiny" and cfg.train.max_steps == 4
    assert cfg.data.dir == "/shared/data/eli5" and cfg.train.strategy == "zero2"  # the manifest's own


@pytest.mark.parametrize("name", ["prepare-job.yaml"])
def test_a_plain_job_is_one_pod(name):
    [job] = docs(name)
    [pod] = job_pod(job).pods
    validate_pod(pod)
    assert pod["spec"] == job["spec"]["template"]["spec"]
