"""launchers/k8s/ -> the Pods Kubernetes would create from them, as `podman kube play` documents.

podman 4.3 plays only Pod, Deployment and PersistentVolumeClaim; a Job, an Indexed Job, a PyTorchJob or a TrainJob
is refused. So this module does what the controllers do: the Job controller (an Indexed Job), the Kubeflow
training operator (a PyTorchJob) or Kubeflow Trainer v2 with JobSet (a TrainJob on its ClusterTrainingRuntime)
turns the pod template into Pods. Everything else comes from the manifest
as shipped. Each change is said in words, in three lists kept apart:

  - kubernetes: what Kubernetes itself adds to a pod from these objects (names, hostname, index, env);
  - podman: where podman 4.3 differs from a cluster (headless-service DNS, host ports, fsGroup);
  - scale_down: what a CPU host of 2 cores needs instead of 8 GPUs per pod (image, processes, a short run).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

# The Job controller's labels/annotation of an Indexed Job's pods (batch/v1, Kubernetes >= 1.24).
INDEX_KEY = "batch.kubernetes.io/job-completion-index"


@dataclass
class Plan:
    """Pods to play, and every change made to the manifest's pod template, in words."""
    pods: list[dict]
    kubernetes: list[str] = field(default_factory=list)
    podman: list[str] = field(default_factory=list)
    scale_down: list[str] = field(default_factory=list)


def pod(name: str, template: dict, labels: dict, annotations: dict | None = None) -> dict:
    meta = copy.deepcopy(template.get("metadata", {}))
    meta["name"] = name
    meta["labels"] = {**meta.get("labels", {}), **labels}
    if annotations:
        meta["annotations"] = {**meta.get("annotations", {}), **annotations}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": copy.deepcopy(template["spec"])}


def add_env(spec: dict, values: dict[str, str]) -> None:
    """Kubernetes-added variables go first: the manifest's own entries of the same name win, as in a pod."""
    for c in spec["containers"]:
        own = {e["name"] for e in c.get("env", [])}
        c["env"] = [{"name": k, "value": v} for k, v in values.items() if k not in own] + c.get("env", [])


def indexed_job_pods(job: dict) -> Plan:
    """An Indexed Job's pods: the Job controller makes `completions` pods from the template, pod i with the
    hostname <job>-<i> (and the template's subdomain), JOB_COMPLETION_INDEX=i and the index label."""
    name, spec = job["metadata"]["name"], job["spec"]
    assert spec.get("completionMode") == "Indexed", f"{name}: not an Indexed Job"
    pods = []
    for i in range(spec["completions"]):
        p = pod(f"{name}-{i}", spec["template"], {"job-name": name, INDEX_KEY: str(i)}, {INDEX_KEY: str(i)})
        p["spec"]["hostname"] = f"{name}-{i}"
        add_env(p["spec"], {"JOB_COMPLETION_INDEX": str(i)})
        pods.append(p)
    return Plan(pods, kubernetes=[
        f"pods {name}-0..{spec['completions'] - 1} (Kubernetes adds a random suffix to the pod name; "
        f"the hostname is {name}-<index> without it)",
        f"hostname {name}-<index> and the labels job-name, {INDEX_KEY} (+ the annotation)",
        "env JOB_COMPLETION_INDEX=<index> in every container"])


def pytorchjob_pods(job: dict) -> Plan:
    """The Kubeflow training operator's pods of a PyTorchJob (kubeflow.org/v1, elastic): <job>-master-0 and
    <job>-worker-<i>, each with the operator's env: PET_* from elasticPolicy and nprocPerNode, MASTER_ADDR
    and MASTER_PORT (the master's service and its pytorchjob-port), WORLD_SIZE and RANK (the pod's)."""
    name, spec = job["metadata"]["name"], job["spec"]
    elastic, replicas = spec["elasticPolicy"], spec["pytorchReplicaSpecs"]
    order = [(r, i) for r in ("Master", "Worker") for i in range(replicas.get(r, {}).get("replicas", 0))]
    master_port = next((p["containerPort"] for c in replicas["Master"]["template"]["spec"]["containers"]
                        for p in c.get("ports", []) if p.get("name") == "pytorchjob-port"), 23456)
    operator_env = {
        "PET_RDZV_BACKEND": elastic["rdzvBackend"],
        "PET_RDZV_ENDPOINT": f"{elastic['rdzvHost']}:{elastic['rdzvPort']}",
        "PET_RDZV_ID": elastic.get("rdzvId", name),
        "PET_NNODES": f"{elastic['minReplicas']}:{elastic['maxReplicas']}",
        "PET_MAX_RESTARTS": str(elastic["maxRestarts"]),
        "PET_NPROC_PER_NODE": str(spec["nprocPerNode"]),
        "PET_RDZV_CONF": ",".join(f"{c['key']}={c['value']}" for c in elastic.get("rdzvConf", [])),
        "MASTER_ADDR": f"{name}-master-0", "MASTER_PORT": str(master_port),
        "WORLD_SIZE": str(len(order)), "PYTHONUNBUFFERED": "1"}
    pods = []
    for rank, (rtype, i) in enumerate(order):
        role = rtype.lower()
        p = pod(f"{name}-{role}-{i}", replicas[rtype]["template"],
                {"training.kubeflow.org/job-name": name, "training.kubeflow.org/replica-type": role,
                 "training.kubeflow.org/replica-index": str(i)})
        add_env(p["spec"], {**operator_env, "RANK": str(rank)})
        # The operator restarts pods itself on ExitCode: the pod's own policy is Never.
        policy = replicas[rtype].get("restartPolicy", "Never")
        p["spec"]["restartPolicy"] = "Never" if policy == "ExitCode" else policy
        pods.append(p)
    return Plan(pods, kubernetes=[
        f"pods {', '.join(p['metadata']['name'] for p in pods)} (the operator's names; their hostnames)",
        "the operator's env: " + ", ".join(sorted(operator_env)) + ", RANK",
        "the operator's labels training.kubeflow.org/{job-name,replica-type,replica-index}",
        "the pod's restartPolicy from the replica's (ExitCode -> Never: the operator replaces the pod)"])


def trainjob_pods(job: dict, runtime: dict) -> Plan:
    """Kubeflow Trainer v2's pods of a TrainJob (trainer.kubeflow.org/v1alpha1): the runtime's JobSet template
    with the trainer's image/command/args/env/resourcesPerNode on the `node` container, the `node` Job scaled to
    numNodes (Indexed), so JobSet names its pods <job>-node-0-<i> (hostname too, subdomain <job>: its headless
    service); the torch plugin's env PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR/PORT."""
    name, trainer = job["metadata"]["name"], job["spec"]["trainer"]
    [node] = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "node"]
    template = copy.deepcopy(node["template"]["spec"]["template"])
    for c in template["spec"]["containers"]:
        if c["name"] != "node":
            continue
        for key in ("image", "command", "args"):
            if key in trainer:
                c[key] = copy.deepcopy(trainer[key])
        env = {e["name"]: e for e in c.get("env", [])}
        env.update({e["name"]: e for e in trainer.get("env", [])})
        c["env"] = list(env.values())
        if "resourcesPerNode" in trainer:
            c["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
    nodes = trainer.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
    nproc = trainer.get("numProcPerNode", runtime["spec"]["mlPolicy"].get("torch", {}).get("numProcPerNode", 1))
    port = next((p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])), 29400)
    master = f"{name}-node-0-0.{name}"
    pods = []
    for i in range(nodes):
        p = pod(f"{name}-node-0-{i}", template,
                {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                 "trainer.kubeflow.org/trainjob-ancestor-step": "trainer", INDEX_KEY: str(i)}, {INDEX_KEY: str(i)})
        p["spec"]["hostname"], p["spec"]["subdomain"] = f"{name}-node-0-{i}", name
        add_env(p["spec"], {"JOB_COMPLETION_INDEX": str(i), "PET_NNODES": str(nodes),
                            "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(i),
                            "PET_MASTER_ADDR": master, "PET_MASTER_PORT": str(port)})
        pods.append(p)
    return Plan(pods, kubernetes=[
        f"pods {name}-node-0-0..{nodes - 1} (JobSet's names + a random suffix; the hostname without it, "
        f"subdomain {name}: JobSet's headless service)",
        "the trainer's image/command/args/env/resourcesPerNode on the runtime's `node` container",
        "the labels jobset.sigs.k8s.io/{jobset-name,replicatedjob-name}, the ancestor step, the completion index",
        "env JOB_COMPLETION_INDEX and the torch plugin's PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, "
        "PET_MASTER_ADDR, PET_MASTER_PORT"])


def job_pod(job: dict) -> Plan:
    """A plain (non-indexed) Job of one completion: the Job controller's one pod from the template."""
    name = job["metadata"]["name"]
    p = pod(name, job["spec"]["template"], {"job-name": name})
    return Plan([p], kubernetes=[f"pod {name} (Kubernetes adds a random suffix), label job-name"])


def for_podman(plan: Plan, services: list[str]) -> Plan:
    """What a cluster gives that podman 4.3 does not: headless-service DNS (<pod>.<service> resolves there;
    on a podman network only the pod's own name does), and ports that stay inside the pod network (podman
    4.3 publishes every containerPort on the host, so two pods of one job cannot both bind it)."""
    secrets = False
    for p in plan.pods:
        for c in p["spec"]["containers"]:
            secrets |= any("valueFrom" in e for e in c.get("env", []))
            c["env"] = [e for e in c.get("env", []) if "valueFrom" not in e]
            for e in c["env"]:
                for svc in services:
                    e["value"] = e["value"].replace(f".{svc}:", ":")
                    e["value"] = e["value"].removesuffix(f".{svc}")  # a host alone (PET_MASTER_ADDR)
            c.pop("ports", None)
    if secrets:
        plan.podman.append("env values from Secrets removed (the optional hf-token: no push in a play)")
    if services:
        plan.podman.append(f"headless-service names <pod>.{'|'.join(services)} -> <pod> in env values "
                           "(podman's DNS resolves pod names, not <pod>.<service>)")
    plan.podman.append("containers' `ports` removed (podman 4.3 publishes each containerPort on the host)")
    plan.podman.append("the claim distclm-shared is a podman volume bound to a host folder owned by uid 1000 "
                       "(what fsGroup: 1000 does to a cluster volume)")
    return plan


def scale_down(plan: Plan, image: str, extra_args: list[str]) -> Plan:
    """A CPU host instead of 8-GPU pods: the CPU image, one process per pod, no resource requests, and
    flags appended after the manifest's own (later flags win) for a short run of a tiny model."""
    for p in plan.pods:
        for c in p["spec"]["containers"]:
            c["image"] = image
            c.pop("resources", None)
            for e in c.get("env", []):
                if e["name"] in ("NPROC_PER_NODE", "PET_NPROC_PER_NODE", "OMP_NUM_THREADS"):
                    e["value"] = "1"
            c["args"] = [*c.get("args", []), *extra_args]
    plan.scale_down += [f"image -> {image}", "NPROC_PER_NODE, PET_NPROC_PER_NODE, OMP_NUM_THREADS -> 1",
                        "resources (GPUs, CPUs, memory requests) removed",
                        "args appended: " + " ".join(extra_args)]
    return plan
