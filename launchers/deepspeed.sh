#!/usr/bin/env bash
# The DeepSpeed launcher, same distclm command line as every other launcher.
#
# From one node, over passwordless ssh to every host of the hostfile (pdsh):
#   HOSTFILE=launchers/hostfile MASTER_ADDR=node0.cluster launchers/deepspeed.sh train \
#       --data.dir=/shared/data/eli5 --model.name=distilgpt2 --run.dir=/shared/runs/eli5 --train.strategy=zero2
#
# Without ssh (containers, schedulers): run it on every node, each with its own NODE_RANK (0 = the first host
# of the hostfile, which hosts MASTER_ADDR:MASTER_PORT):
#   NO_SSH=1 NODE_RANK=1 HOSTFILE=launchers/hostfile MASTER_ADDR=node0.cluster launchers/deepspeed.sh train ...
#
# Settings (environment):
#   HOSTFILE     `HOST slots=N` per line (launchers/hostfile.example); unset: this node only, one process
#                per GPU
#   MASTER_ADDR  address of node rank 0, reachable from every node      (required with a hostfile)
#   MASTER_PORT  a free port on node rank 0                            (default 29500)
#   NO_SSH=1     launch only this node's processes; needs NODE_RANK
#   NODE_RANK    this node's line in the hostfile, from 0
#   PYTHON       the interpreter that has distclm and deepspeed installed         (default python3)
#   DISTCLM_DRY_RUN=1  print the command instead of running it
#
# The launcher adds --local_rank=N: distclm accepts and ignores it (ranks come from the environment). On CPU
# the processes use gloo; set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface the nodes share, and
# --train.dist_timeout_s to how long node 0 should wait for late nodes (default 600 s).
set -euo pipefail

MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-python3}"

if [[ $# -eq 0 ]]; then
    echo "usage: [HOSTFILE=F MASTER_ADDR=host NO_SSH=1 NODE_RANK=r] $0 COMMAND [--section.key=value ...]" >&2
    exit 2
fi

cmd=("$PYTHON" -m deepspeed.launcher.runner --master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
    if [[ ! -f "$HOSTFILE" ]]; then
        echo "$0: HOSTFILE=$HOSTFILE: no such file (see launchers/hostfile.example)" >&2
        exit 2
    fi
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        echo "$0: a hostfile needs MASTER_ADDR (the address of its first host, reachable from every node)" >&2
        exit 2
    fi
    cmd+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR")
else
    # No hostfile: this node alone (the runner counts its GPUs; NPROC_PER_NODE overrides, e.g. on CPU).
    cmd+=(--hostfile /dev/null)
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then cmd+=(--num_gpus "$NPROC_PER_NODE"); fi
fi
if [[ "${NO_SSH:-0}" == "1" ]]; then
    if [[ -z "${NODE_RANK:-}" || -z "${HOSTFILE:-}" ]]; then
        echo "$0: NO_SSH=1 needs HOSTFILE (every node, the same) and NODE_RANK (this node's line in it, from 0)" >&2
        exit 2
    fi
    cmd+=(--no_ssh --node_rank "$NODE_RANK")
fi
cmd+=(--module distclm.cli "$@")

if [[ "${DISTCLM_DRY_RUN:-0}" == "1" ]]; then
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    echo
    exit 0
fi
exec "${cmd[@]}"
