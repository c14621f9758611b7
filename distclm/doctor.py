"""`distclm doctor`: what this process can use, and whether the ranks of a launch can talk to each other.

    distclm doctor                                   # versions, DeepSpeed ops, launcher env, resolved config
    launchers/torchrun.sh doctor                     # + on every rank: an all-reduce within --train.dist_timeout_s
    NNODES=2 RDZV_ENDPOINT=node0:29500 launchers/torchrun.sh doctor --train.dist_timeout_s=60

Only rank 0 prints the report. Under a launcher, every rank first checks in at the store on
MASTER_ADDR:MASTER_PORT (its rank, node and host), then forms the process group and all-reduces a tensor
of ones. Each rank records its outcome in the store; rank 0 waits for them and names every rank that
failed or never arrived, with its host, and every rank exits with the same code (0 all good, 1 not).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from importlib import metadata

from distclm import __version__, config, dist
from distclm.config import Config
from distclm.dist import explain_init_errors
from distclm.errors import UserError, first_line
from distclm.launch_checks import RankInfo, check_topology, launcher_node_count, rank_info

# The launcher's environment worth seeing when a launch misbehaves (exact names, then prefixes).
ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
             "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "NODE_RANK",
             "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_OFFLINE")
ENV_PREFIXES = ("TORCHELASTIC_", "PET_", "NCCL_", "GLOO_", "SLURM_JOB_ID", "SLURM_NNODES", "SLURM_NODEID",
                "SLURM_PROCID", "SLURM_GPUS", "ACCELERATE_", "DISTCLM_")


def versions() -> list[tuple[str, str]]:
    import torch

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    nccl = "n/a (no CUDA build)"
    if torch.version.cuda and hasattr(torch.cuda, "nccl"):
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as exc:  # a CUDA build without a usable NCCL library
            nccl = f"unavailable ({exc})"
    return [
        ("python", platform.python_version()),
        ("distclm", __version__),
        ("torch", f"{torch.__version__} (built for CUDA {torch.version.cuda or 'none: CPU build'})"),
        ("CUDA", f"{len(gpus)} GPU(s): {', '.join(sorted(set(gpus)))}" if gpus else "no GPU visible"),
        ("NCCL", nccl),
        ("gloo", "yes" if torch.distributed.is_gloo_available() else "no"),
        ("deepspeed", version("deepspeed")),
        ("accelerate", version("accelerate")),
        ("transformers", version("transformers")),
        ("host", f"{socket.gethostname()} ({platform.platform()}, {os.cpu_count()} CPUs)"),
    ]


def extensions_dir() -> str:
    """Where torch JIT-builds C++ ops (DeepSpeed's included): TORCH_EXTENSIONS_DIR, else torch's default."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    cu = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_{cu}")


def launcher_env(env=None) -> list[tuple[str, str]]:
    env = os.environ if env is None else env
    keys = [k for k in ENV_NAMES if k in env]
    keys += sorted(k for k in env if k.startswith(ENV_PREFIXES) and k not in keys)
    return [(k, env[k]) for k in keys]


def _table(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    if not rows:
        return [f"{indent}(none)"]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    return [indent + "  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)) + "  " + str(r[-1]) for r in rows]


def report(cfg: Config, mine: RankInfo) -> str:
    from distclm.engine import deepspeed_ops

    accel, ops = deepspeed_ops(extensions_dir())
    lines = [f"distclm doctor: rank {mine.rank} of {mine.world} on {mine.host}", "", "versions"]
    lines += _table(versions())
    lines += ["", f"deepspeed ops (accelerator {accel}; JIT cache {extensions_dir()})"]
    lines += _table([("op", "prebuilt", "JIT-buildable", "JIT cache"), *ops])
    lines += ["", "launcher environment"]
    lines += _table(launcher_env())
    lines += ["", "resolved config"]
    try:
        from distclm.dist import pick_backend, pick_precision
        from distclm.ds_config import zero_stage

        stage = zero_stage(cfg.train.strategy)
        lines.append(f"  # backend {pick_backend(cfg.train)}, precision {pick_precision(cfg.train)}, "
                     f"{'DeepSpeed ZeRO-' + str(stage) if stage else 'DDP'} (--train.strategy={cfg.train.strategy})")
    except UserError as exc:
        lines.append(f"  # cannot run as configured here: {exc}")
    lines += ["  " + line for line in config.to_yaml(cfg).rstrip().splitlines()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Several ranks: check in, all-reduce, and name whoever failed


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}"


def _connect_store(mine: RankInfo, timeout_s: float):
    """The store at MASTER_ADDR:MASTER_PORT: torchrun's agent hosts it; otherwise rank 0 does."""
    import torch.distributed as td

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise UserError(f"WORLD_SIZE={mine.world} but MASTER_ADDR/MASTER_PORT are not set: start doctor through "
                        f"the same launcher as training (launchers/)")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    with explain_init_errors(timeout_s):
        store = td.TCPStore(addr, int(port), None, mine.rank == 0 and not agent, timedelta(seconds=timeout_s),
                            wait_for_workers=False)
    prefix = f"distclm-doctor/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return td.PrefixStore(prefix, store), f"{addr}:{port}"


def _all_reduce(cfg: Config, mine: RankInfo, store, timeout_s: float) -> str | None:
    """Form the process group and all-reduce ones; -> None, or what went wrong on this rank."""
    import torch
    import torch.distributed as td

    from distclm.dist import form_process_group, pick_backend
    from distclm.launch_checks import check_same_versions

    try:
        # The same process-group formation as train, eval and generate, on the check-in store.
        form_process_group(cfg.train, store=td.PrefixStore("pg", store), needed=True)
        check_same_versions()  # a mismatch is this launch's problem, named by rank and host
        cuda = pick_backend(cfg.train) == "nccl"
        x = torch.ones(1024, device=dist.device() if cuda else torch.device("cpu"))
        td.all_reduce(x)
        if not bool((x == mine.world).all()):
            return f"all-reduce of ones gave {x[0].item()}, expected {mine.world}"
        return None
    except UserError as exc:
        return str(exc)
    except Exception as exc:
        return _first_line(exc)


def _wait_keys(store, keys: list[str], seconds: float) -> list[str]:
    """Keys still missing after waiting up to `seconds` (polling: store.wait would raise on the first)."""
    deadline = time.monotonic() + seconds
    while True:
        missing = [k for k in keys if not store.check([k])]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.2)


def _verdict(mine: RankInfo, store, endpoint: str, timeout_s: float, grace_s: float) -> dict:
    """Rank 0: the outcome of every rank, naming rank and host of each failure."""
    world = mine.world
    _wait_keys(store, [f"done/{r}" for r in range(world)], grace_s)
    infos, problems = {}, []
    for r in range(world):
        info = json.loads(store.get(f"info/{r}")) if store.check([f"info/{r}"]) else None
        if info is not None:
            infos[r] = RankInfo(**info)
        where = f"rank {r} ({infos[r].where})" if r in infos else f"rank {r}"
        if info is None:
            problems.append(f"{where} never reached the store at {endpoint} (host unknown): is its node started, "
                            f"with this endpoint?")
        elif not store.check([f"done/{r}"]):
            problems.append(f"{where} joined the store but did not finish the all-reduce within {timeout_s:g}s")
        else:
            error = json.loads(store.get(f"done/{r}"))["error"]
            if error:
                problems.append(f"{where} failed: {error}")
    summary = None
    if len(infos) == world:
        try:
            summary = check_topology(list(infos.values()), launcher_node_count())
        except UserError as exc:
            problems.append(str(exc))
    return {"ok": not problems, "problems": problems, "summary": summary}


def network_check(cfg: Config, mine: RankInfo) -> tuple[bool, list[str]]:
    """Every rank: check in, all-reduce, record; rank 0 decides and tells the others. -> (ok, lines to print)."""
    timeout_s = cfg.train.dist_timeout_s
    store, endpoint = _connect_store(mine, timeout_s)
    store.set(f"info/{mine.rank}", json.dumps(asdict(mine)))
    t0 = time.perf_counter()
    error = _all_reduce(cfg, mine, store, timeout_s)
    seconds = time.perf_counter() - t0
    store.set(f"done/{mine.rank}", json.dumps({"error": error, "seconds": seconds}))
    # After a failure the others may still be inside their own timeout: wait for them as long.
    grace_s = 10.0 if error is None else timeout_s + 10.0
    if mine.rank == 0:
        verdict = _verdict(mine, store, endpoint, timeout_s, grace_s)
        store.set("verdict", json.dumps(verdict))
        _wait_keys(store, [f"read/{r}" for r in range(1, mine.world)], 5.0)  # they read it before the store goes
    else:
        if _wait_keys(store, ["verdict"], grace_s + timeout_s + 10.0):
            verdict = {"ok": False, "problems": [f"rank 0 gave no verdict (it hosts the store at {endpoint})"],
                       "summary": None}
        else:
            verdict = json.loads(store.get("verdict"))
            store.set(f"read/{mine.rank}", "1")
    _close(error is None and verdict["ok"])
    if mine.rank != 0:
        return verdict["ok"], [f"rank {mine.rank} ({mine.where}): {error}"] if error else []
    if verdict["ok"]:
        return True, [f"all-reduce over {mine.world} ranks ok in {seconds:.2f}s: {verdict['summary']}"]
    return False, [f"all-reduce over {mine.world} ranks FAILED (rendezvous {endpoint}, timeout {timeout_s:g}s):",
                   *(f"  {p}" for p in verdict["problems"])]


def _close(healthy: bool) -> None:
    import torch.distributed as td

    if td.is_initialized():
        if healthy:
            td.barrier()
        td.destroy_process_group()


def doctor_command(inv) -> int:
    cfg, mine = inv.cfg, rank_info()
    if mine.rank == 0:
        print(report(cfg, mine), flush=True)
        print("\nnetwork")
    if mine.world == 1:
        print("  one process: nothing to all-reduce (run doctor through the launcher, e.g. launchers/torchrun.sh "
              "doctor, to test the nodes' network)")
        return 0
    ok, lines = network_check(cfg, mine)
    for line in lines:
        print(("  " if mine.rank == 0 else "doctor: ") + line, file=sys.stdout if mine.rank == 0 else sys.stderr,
              flush=True)
    return 0 if ok else 1
