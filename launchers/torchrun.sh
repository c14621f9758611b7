#!/usr/bin/env bash
# One torchrun per node, c10d rendezvous: every node runs this same line, nothing rank-specific in it.
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0.cluster:29500 RDZV_ID=job-42 \
#       launchers/torchrun.sh train --data.dir=/shared/data/eli5 --model.name=distilgpt2 \
#       --run.dir=/shared/runs/eli5 --train.strategy=zero2
#
#   launchers/torchrun.sh doctor          # check the nodes first: versions, env, an all-reduce on every rank
#
# Settings (environment):
#   NNODES          nodes, or MIN:MAX for an elastic job                              (default 1)
#   NPROC_PER_NODE  processes per node: one per GPU                  (default: the GPUs nvidia-smi lists, else 1)
#   RDZV_ENDPOINT   host:port of the rendezvous, reachable from every node; the node it names hosts it
#                   (by address, or by short hostname = the name's first label)  (required when NNODES is not 1)
#   RDZV_ID         a job id shared by the nodes of one job, different for the next job  (default distclm)
#   RDZV_TIMEOUT    seconds a node waits for the others to join (and for the rendezvous host to come up);
#                   raise it when nodes start far apart                                  (default 900)
#   MAX_RESTARTS    times torchrun restarts the workers after a failure; distclm resumes from the newest
#                   complete checkpoint in --run.dir                                     (default 3)
#   RDZV_CONF       extra rendezvous settings, e.g. is_host=1 on the node that hosts the endpoint when its
#                   address is not one torchrun recognises (a NAT or a second interface)
#   LOCAL_ADDR      this node's address as the others reach it (torchrun --local-addr)
#   PYTHON          the interpreter that has distclm installed                    (default python3)
#   DISTCLM_DRY_RUN=1  print the torchrun command instead of running it
# Unset, NNODES, NPROC_PER_NODE, RDZV_ENDPOINT, RDZV_ID and MAX_RESTARTS fall back to the PET_* variables
# that the Kubeflow training operator derives from a PyTorchJob's elasticPolicy.
#
# Against the classic hangs: every node must get the same RDZV_ENDPOINT, NNODES and RDZV_ID; set
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface the nodes share (e.g. eth0, ib0) when a node has
# several; --train.dist_timeout_s bounds every wait inside distclm (default 600 s).
set -euo pipefail

# Unset settings fall back to the PET_* variables the Kubeflow training operator sets from a PyTorchJob.
NNODES="${NNODES:-${PET_NNODES:-1}}"
NPROC_PER_NODE="${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-}}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-${PET_RDZV_ENDPOINT:-}}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
        if [[ "${gpus:-0}" -gt 0 ]]; then NPROC_PER_NODE="$gpus"; fi
    fi
fi
RDZV_ID="${RDZV_ID:-${PET_RDZV_ID:-distclm}}"
RDZV_TIMEOUT="${RDZV_TIMEOUT:-900}"
MAX_RESTARTS="${MAX_RESTARTS:-${PET_MAX_RESTARTS:-3}}"
PYTHON="${PYTHON:-python3}"

if [[ $# -eq 0 ]]; then
    echo "usage: [NNODES=N NPROC_PER_NODE=P RDZV_ENDPOINT=host:port RDZV_ID=id] $0 COMMAND [--section.key=value ...]" >&2
    exit 2
fi

cmd=("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS")
if [[ "$NNODES" == "1" && -z "$RDZV_ENDPOINT" ]]; then
    cmd+=(--standalone --nnodes 1)  # one node: a private rendezvous on a free local port
else
    if [[ -z "$RDZV_ENDPOINT" ]]; then
        echo "$0: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the same on every node)" >&2
        exit 2
    fi
    # join_timeout: how long the rendezvous waits for all nodes; read_timeout: how long a node keeps trying
    # to reach the endpoint (its host may start later than this node).
    conf="join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_TIMEOUT${RDZV_CONF:+,$RDZV_CONF}"
    # torchrun decides who hosts the endpoint by resolving its name, which fails while a new pod's DNS record
    # is not out yet (Kubernetes): when the endpoint's first label is this machine's short hostname, say so.
    rdzv_host="${RDZV_ENDPOINT%:*}"
    if [[ "$conf" != *is_host=* && ! "$rdzv_host" =~ ^[0-9.]+$ && "${rdzv_host%%.*}" == "$(hostname -s 2>/dev/null || hostname)" ]]; then
        conf+=",is_host=1"
    fi
    cmd+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID"
          --rdzv-conf "$conf")
    if [[ -n "${LOCAL_ADDR:-}" ]]; then cmd+=(--local-addr "$LOCAL_ADDR"); fi
fi
cmd+=(-m distclm.cli "$@")

if [[ "${DISTCLM_DRY_RUN:-0}" == "1" ]]; then
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    echo
    exit 0
fi
# torchrun exits 1 whatever its workers' codes: they write theirs under DISTCLM_EXIT_DIR (distclm/exit_code.py)
# and this script exits with the last attempt's cause: 75 a hang (retry), 2 a user error (do not), 1 a crash.
# (No writable temp folder, e.g. a read-only root file system without TMPDIR: torchrun's own 1, as before.)
exit_dir="$(mktemp -d "${TMPDIR:-/tmp}/distclm-exit.XXXXXX" 2>/dev/null)" || exit_dir=""
if [[ -n "$exit_dir" ]]; then export DISTCLM_EXIT_DIR="$exit_dir"; fi
# Not exec: torchrun turns a SIGTERM into exit 1 (SignalException), which restart policies read as a crash
# (a PyTorchJob's ExitCode policy fails the job on 1). torchrun gets the signal (it stops the workers, which
# save: --train.preempt_grace_s, under torchrun's own 30 s) and this script exits 143, the retryable code.
terminated=0
"${cmd[@]}" &
child=$!
trap 'terminated=1; kill -TERM "$child" 2>/dev/null || true' TERM
trap 'terminated=1; kill -INT "$child" 2>/dev/null || true' INT
rc=0
while true; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break  # a trapped signal ends `wait` early: wait again for torchrun
done
if [[ -n "$exit_dir" ]]; then
    last="$(find "$exit_dir" -name 'attempt-*' ! -name '*.code' -printf '%f\n' | sort -t- -k2 -n | tail -n 1)"
    if [[ "$rc" != 0 && -n "$last" && -s "$exit_dir/$last.code" ]]; then rc="$(<"$exit_dir/$last.code")"; fi
    rm -rf "$exit_dir"
fi
if [[ "$terminated" == 1 ]]; then exit 143; fi
exit "$rc"
