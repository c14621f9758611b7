"""launchers/k8s/: every document is schema-valid, and every pod runs a distclm command line with what the
launch needs (rendezvous, topology, NCCL/gloo interface, shared volume, /dev/shm, GPUs, non-root).

Core kinds (Job, Service, PersistentVolumeClaim, pod templates) are checked against the Kubernetes API
models of the official `kubernetes` client (pydantic, generated from the OpenAPI schema, offline): unknown
fields, missing required fields and wrong types all fail. The PyTorchJob (a CRD the client does not know)
is checked field by field against kubeflow.org/v1, with its pod templates checked as above; so are Kubeflow Trainer
v2's TrainJob and ClusterTrainingRuntime (trainer.kubeflow.org/v1alpha1, a JobSet template), whose pod is the
runtime's pod template with the TrainJob's trainer fields applied, as the Trainer controller builds it.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from distclm.cli import parse

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "launchers" / "k8s"
IMAGE_ROOT = "/opt/distclm"  # where the Dockerfiles copy the repository (COPY launchers ./launchers)

CORE_MODELS = {("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim", ("v1", "Service"): "V1Service",
               ("batch/v1", "Job"): "V1Job"}
PYTORCHJOB_SPEC = {"runPolicy", "elasticPolicy", "pytorchReplicaSpecs", "nprocPerNode"}
ELASTIC_POLICY = {"minReplicas", "maxReplicas", "rdzvBackend", "rdzvPort", "rdzvHost", "rdzvId", "rdzvConf",
                  "standalone", "nProcPerNode", "maxRestarts", "metrics"}
RUN_POLICY = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
              "schedulingPolicy", "suspend", "managedBy"}
REPLICA_SPEC = {"replicas", "template", "restartPolicy"}
CRDS = {"PyTorchJob", "TrainJob", "ClusterTrainingRuntime"}  # kinds the kubernetes client's models do not know
TRAINER_V2 = "trainer.kubeflow.org/v1alpha1"
TRAINJOB_SPEC = {"runtimeRef", "trainer", "initializer", "labels", "annotations", "podSpecOverrides", "suspend",
                 "managedBy"}
TRAINER = {"image", "command", "args", "env", "numNodes", "resourcesPerNode", "numProcPerNode"}
RUNTIME_SPEC = {"mlPolicy", "template", "podGroupPolicy"}
LAUNCH_ENV = {"NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_TIMEOUT", "MAX_RESTARTS",
              "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"}


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def by_kind(kind: str) -> list[tuple[str, dict]]:
    return [(f, d) for f, d in documents() if d["kind"] == kind]


def validate_model(model: str, obj: dict) -> None:
    from kubernetes import client

    getattr(client, model).model_validate(obj)  # raises pydantic.ValidationError naming each bad field


def env_of(container: dict) -> dict[str, str]:
    """The literal env values (a value from a Secret or field ref is not a literal: see test_no_secret_inline)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def trainjob_pod(job: dict) -> dict:
    """The pod template the Trainer controller makes of a TrainJob: its runtime's `node` pod, with the trainer's
    image, command, args, env (merged by name) and resourcesPerNode applied to the `node` container."""
    import copy

    ref = job["spec"]["runtimeRef"]
    [runtime] = [d for _, d in by_kind(ref["kind"]) if d["metadata"]["name"] == ref["name"]]
    [node] = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == "node"]
    pod = copy.deepcopy(node["template"]["spec"]["template"])
    [container] = [c for c in pod["spec"]["containers"] if c["name"] == "node"]
    trainer = job["spec"]["trainer"]
    for key in ("image", "command", "args"):
        if key in trainer:
            container[key] = trainer[key]
    env = {e["name"]: e for e in container.get("env", [])}
    env.update({e["name"]: e for e in trainer.get("env", [])})
    container["env"] = list(env.values())
    if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
    return pod


def training_pods() -> list[tuple[str, dict, dict]]:
    """(where, pod template, the document) of every pod that trains."""
    pods = []
    for name, doc in by_kind("PyTorchJob"):
        for rtype, spec in doc["spec"]["pytorchReplicaSpecs"].items():
            pods.append((f"{name} {rtype}", spec["template"], doc))
    for name, doc in by_kind("Job"):
        if doc["metadata"]["name"] != "distclm-prepare":
            pods.append((name, doc["spec"]["template"], doc))
    for name, doc in by_kind("TrainJob"):
        pods.append((f"{name} node", trainjob_pod(doc), doc))
    return pods


def launch_args(container: dict) -> list[str]:
    """The distclm command line a container runs: after `distclm` or after launchers/torchrun.sh."""
    command, args = container["command"], container.get("args", [])
    if command == ["distclm"]:
        return args
    assert command[0] == f"{IMAGE_ROOT}/launchers/torchrun.sh", command
    assert (REPO / "launchers" / "torchrun.sh").exists()
    return args


def test_there_are_both_flavours_and_a_shared_volume():
    kinds = sorted({d["kind"] for _, d in documents()})
    assert kinds == ["ClusterTrainingRuntime", "Job", "PersistentVolumeClaim", "PyTorchJob", "Service", "TrainJob"]
    assert {f for f, _ in documents()} >= {"pytorchjob.yaml", "indexed-job.yaml", "pvc.yaml", "trainjob.yaml",
                                           "training-runtime.yaml"}


@pytest.mark.parametrize("where, doc", [(f"{f}:{d['kind']}", d) for f, d in documents() if d["kind"] not in CRDS])
def test_core_documents_match_the_kubernetes_schema(where, doc):
    model = CORE_MODELS[(doc["apiVersion"], doc["kind"])]
    validate_model(model, doc)


def test_a_misspelt_field_is_caught():
    # The validator is strict: a typo is an error, not a silently dropped field.
    import pydantic

    _, job = by_kind("Job")[0]
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["template"]["spec"]["contianers"] = bad["spec"]["template"]["spec"].pop("containers")
    with pytest.raises(pydantic.ValidationError, match="contianers"):
        validate_model("V1Job", bad)


def container_args(replica: dict) -> list[str]:
    return replica["template"]["spec"]["containers"][0]["args"]


def test_pytorchjob_follows_kubeflow_v1():
    [(_, job)] = by_kind("PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert set(job) <= {"apiVersion", "kind", "metadata", "spec"}
    validate_model("V1ObjectMeta", job["metadata"])
    spec = job["spec"]
    assert set(spec) <= PYTORCHJOB_SPEC and "pytorchReplicaSpecs" in spec
    assert set(spec["runPolicy"]) <= RUN_POLICY
    assert spec["runPolicy"].get("cleanPodPolicy", "None") in ("All", "Running", "None")
    elastic = spec["elasticPolicy"]
    assert set(elastic) <= ELASTIC_POLICY
    assert elastic["rdzvBackend"] in ("c10d", "etcd", "etcd-v2")
    assert 1 <= elastic["minReplicas"] <= elastic["maxReplicas"] and elastic["maxRestarts"] >= 1
    assert all(set(c) == {"key", "value"} and isinstance(c["value"], str) for c in elastic.get("rdzvConf", []))
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}  # master + workers
    assert replicas["Master"]["replicas"] == 1
    total = sum(r["replicas"] for r in replicas.values())
    assert elastic["minReplicas"] <= total <= elastic["maxReplicas"]
    for rtype, rs in replicas.items():
        assert set(rs) <= REPLICA_SPEC, rtype
        assert rs["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        validate_model("V1PodTemplateSpec", rs["template"])
        names = [c["name"] for c in rs["template"]["spec"]["containers"]]
        assert "pytorch" in names  # the operator finds the training container (and its port) by this name
    # The launch settings mirror the elastic policy: one source of truth would be the operator's PET_* variables,
    # which torchrun.sh also reads; the explicit copy keeps the manifest readable and this test checks they agree.
    env = env_of(replicas["Master"]["template"]["spec"]["containers"][0])
    assert env["NNODES"] == f"{elastic['minReplicas']}:{elastic['maxReplicas']}"
    assert env["RDZV_ENDPOINT"] == f"{elastic['rdzvHost']}:{elastic['rdzvPort']}"
    assert elastic["rdzvHost"] == f"{job['metadata']['name']}-master-0"  # the operator's service of the master pod
    assert env["RDZV_ID"] == elastic["rdzvId"] and env["MAX_RESTARTS"] == str(elastic["maxRestarts"])
    assert env["NPROC_PER_NODE"] == spec["nprocPerNode"]
    # Elastic: any pod count in [min, max] divides the global batch, so a job that comes back with another count
    # resumes instead of being refused (--train.global_batch_size, checked by distclm's own parser).
    from distclm.cli import parse

    cfg = parse(container_args(replicas["Master"])).cfg
    assert cfg.train.global_batch_size is not None
    for pods in range(elastic["minReplicas"], elastic["maxReplicas"] + 1):
        world = pods * int(spec["nprocPerNode"])
        assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * world) == 0, pods
    conf = {c["key"]: c["value"] for c in elastic["rdzvConf"]}
    assert conf["join_timeout"] == env["RDZV_TIMEOUT"]
    ports = {p["containerPort"] for p in replicas["Master"]["template"]["spec"]["containers"][0]["ports"]}
    assert elastic["rdzvPort"] in ports


def test_indexed_job_has_a_headless_service_and_stable_pod_names():
    [(_, service)] = by_kind("Service")
    [job] = [d for _, d in by_kind("Job") if d["spec"].get("completionMode") == "Indexed"]
    name = job["metadata"]["name"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"job-name": name}  # the label the Job controller puts on its pods
    assert pod["subdomain"] == service["metadata"]["name"]
    env = env_of(pod["containers"][0])
    port = service["spec"]["ports"][0]["port"]
    assert env["RDZV_ENDPOINT"] == f"{name}-0.{pod['subdomain']}:{port}"  # pod index 0 hosts the rendezvous
    assert env["NNODES"] == str(spec["completions"]) == str(spec["parallelism"])
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    rule = spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]  # distclm's user-error exit code
    assert rule["onExitCodes"]["containerName"] == pod["containers"][0]["name"]


@pytest.mark.parametrize("where, template, doc", training_pods(), ids=[w for w, _, _ in training_pods()])
def test_training_pods_have_what_the_launch_needs(where, template, doc):
    pod = template["spec"]
    [container] = pod["containers"]
    inv = parse(launch_args(container))
    assert inv is not None and inv.command == "train"
    env = env_of(container)
    assert LAUNCH_ENV <= set(env), LAUNCH_ENV - set(env)
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == container["resources"]["requests"]["nvidia.com/gpu"] == env["NPROC_PER_NODE"]
    # Data and checkpoints on the shared ReadWriteMany claim; /dev/shm from memory.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = volumes[mounts["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory"
    shared_path = next(p for p, n in mounts.items() if "persistentVolumeClaim" in volumes[n])
    claim = volumes[mounts[shared_path]]["persistentVolumeClaim"]["claimName"]
    [(_, pvc)] = [(f, d) for f, d in by_kind("PersistentVolumeClaim") if d["metadata"]["name"] == claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for flag in (inv.cfg.data.dir, inv.cfg.run.dir):
        assert flag.startswith(shared_path + "/"), flag
    # Non-root, no privilege escalation; time to save a checkpoint on SIGTERM.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["terminationGracePeriodSeconds"] > inv.cfg.train.preempt_grace_s


@pytest.mark.parametrize("where, template, doc", training_pods(), ids=[w for w, _, _ in training_pods()])
def test_torchrun_sh_turns_the_pod_env_into_a_multi_node_launch(where, template, doc, tmp_path):
    # Run the container's command as the pod would, with only the manifest's environment (dry run).
    [container] = template["spec"]["containers"]
    command = [str(REPO / "launchers" / "torchrun.sh"), *container["args"]]
    env = {"PATH": "/usr/bin:/bin", "DISTCLM_DRY_RUN": "1", **env_of(container)}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    opts = dict(zip(argv, argv[1:]))
    assert opts["--nnodes"] == env["NNODES"] and opts["--rdzv-endpoint"] == env["RDZV_ENDPOINT"]
    assert opts["--rdzv-backend"] == "c10d" and opts["--nproc-per-node"] == env["NPROC_PER_NODE"]
    assert f"join_timeout={env['RDZV_TIMEOUT']}" in opts["--rdzv-conf"]
    assert "--standalone" not in argv
    assert argv[argv.index("distclm.cli") + 1:] == container["args"]


def test_prepare_job_runs_a_distclm_command_line():
    [job] = [d for _, d in by_kind("Job") if d["metadata"]["name"] == "distclm-prepare"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    inv = parse(launch_args(container))
    assert inv.command == "prepare" and inv.cfg.data.dir.startswith("/shared/")


def test_trainjob_and_its_runtime_follow_kubeflow_trainer_v2():
    [(_, job)] = by_kind("TrainJob")
    [(_, runtime)] = by_kind("ClusterTrainingRuntime")
    for doc in (job, runtime):
        assert doc["apiVersion"] == TRAINER_V2 and set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
        validate_model("V1ObjectMeta", doc["metadata"])
    spec, trainer = job["spec"], job["spec"]["trainer"]
    assert set(spec) <= TRAINJOB_SPEC and set(trainer) <= TRAINER
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": runtime["metadata"]["name"]}
    # The runtime: the torch framework, a JobSet template whose "node" Job the controller scales to numNodes
    assert set(runtime["spec"]) <= RUNTIME_SPEC
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    policy = runtime["spec"]["mlPolicy"]
    assert set(policy) <= {"numNodes", "torch"} and set(policy["torch"]) <= {"numProcPerNode", "elasticPolicy"}
    jobset = runtime["spec"]["template"]["spec"]
    [node] = jobset["replicatedJobs"]
    assert node["name"] == "node" and set(node) <= {"name", "replicas", "template", "dependsOn"}
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    validate_model("V1JobTemplateSpec", node["template"])  # the Job and its pod, against the Kubernetes schema
    pod = node["template"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["node"]  # the container the torch plugin configures
    # Nodes and processes: the TrainJob's numbers, the env torchrun.sh reads and the GPUs agree
    env = env_of(trainjob_pod(job)["spec"]["containers"][0])
    assert env["NNODES"] == str(trainer["numNodes"]) and env["NPROC_PER_NODE"] == str(trainer["numProcPerNode"])
    assert str(policy["torch"]["numProcPerNode"]) == env["NPROC_PER_NODE"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == env["NPROC_PER_NODE"]
    name = job["metadata"]["name"]
    port = pod["containers"][0]["ports"][0]["containerPort"]
    assert env["RDZV_ENDPOINT"] == f"{name}-node-0-0.{name}:{port}"  # JobSet's pod 0 DNS: <jobset>-<job>-0-0.<jobset>
    assert env["RDZV_ID"] == name
    # Exit codes: 2 fails the Job at once and the JobSet with it; retryable exits replace the pod
    job_spec = node["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job_spec["backoffLimit"] >= 1
    rule = job_spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"] == {"containerName": "node", "operator": "In",
                                                                    "values": [2]}
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in job_spec["podFailurePolicy"]["rules"]
    assert jobset["failurePolicy"]["rules"] == [{"action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]
    assert jobset["failurePolicy"]["maxRestarts"] >= 1


def test_no_secret_inline_hf_token_from_a_secret():
    """A token never sits in a manifest: HF_TOKEN (for --train.push_to_hub) comes from a Secret, optional."""
    secret = ("TOKEN", "KEY", "SECRET", "PASSWORD")
    for where, doc in documents():
        text = yaml.safe_dump(doc)
        assert "hf_" not in text.replace("hf_token", "").replace("hf-token", ""), where

        def containers(node):
            if isinstance(node, dict):
                if "containers" in node:
                    yield from node["containers"]
                for v in node.values():
                    yield from containers(v)
            elif isinstance(node, list):
                for v in node:
                    yield from containers(v)

        for container in containers(doc):
            for e in container.get("env", []):
                if any(s in e["name"] for s in secret):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (where, e["name"])
    [(_, runtime)] = by_kind("ClusterTrainingRuntime")
    [node] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    [token] = [e for e in node["template"]["spec"]["template"]["spec"]["containers"][0]["env"]
               if e["name"] == "HF_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token", "optional": True}
