"""Start-up checks every launch runs, so a bad launch fails at once and names the node at fault.

(A rendezvous or backend that cannot be reached is explained where the process group forms: dist.py.)

Once the process group exists (`check_launch`, right after the run dir is agreed on):

1. ranks come from the launcher's environment only: RANK, WORLD_SIZE and LOCAL_RANK are set together,
   in range, and the process group agrees with them;
2. the topology adds up: WORLD_SIZE = nodes x processes per node, every node runs the same number,
   and as many nodes joined as the launcher announced (GROUP_WORLD_SIZE / CROSS_SIZE);
3. the run directory is one folder seen by every node: each rank writes a probe file into it and rank 0
   reads them all back. A node with its own local copy (no shared storage) would otherwise write its
   checkpoint shards where no one will ever find them.

Every rank computes the same verdict (or receives rank 0's), so every rank raises the same UserError.

As soon as any command forms a multi-rank group (`check_same_versions`, from Engine.start): every rank runs the same
distclm, torch, transformers and deepspeed. Two versions exchange tensors and checkpoints in formats only one of
them may read, and the failure, if any, comes far from its cause.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from distclm import dist
from distclm.errors import UserError

# Which node a rank is on, by launcher: torchrun (and accelerate launch, Slurm-through-torchrun,
# Kubeflow) sets GROUP_RANK; the deepspeed launcher sets CROSS_RANK. Hostnames are the fallback.
NODE_RANK_VARS = ("GROUP_RANK", "CROSS_RANK", "NODE_RANK")
NODE_COUNT_VARS = ("GROUP_WORLD_SIZE", "CROSS_SIZE")
LOCAL_WORLD_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")
PROBE_WAIT_S = 5.0  # a network filesystem may show another node's new file a moment late


@dataclass(frozen=True)
class RankInfo:
    """Where one rank runs, as its launcher told it."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    node: str  # the launcher's node rank, else the hostname
    host: str

    @property
    def where(self) -> str:
        return f"node {self.node} on {self.host}" if self.node != self.host else f"host {self.host}"


def _int_env(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} from the launcher's environment is not an integer") from None


def rank_info(env: Mapping[str, str] | None = None, host: str | None = None) -> RankInfo:
    """This rank's place, from the launcher's environment only (never from the command line)."""
    env = os.environ if env is None else env
    host = host or socket.gethostname()
    world = _int_env(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1
    if world < 1:
        raise UserError(f"WORLD_SIZE={world} from the launcher's environment must be at least 1")
    if world == 1 and "RANK" not in env:
        return RankInfo(0, 1, 0, 1, env.get("GROUP_RANK", host), host)
    missing = [k for k in ("RANK", "LOCAL_RANK") if k not in env]
    if missing:
        raise UserError(f"WORLD_SIZE={world} is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                        f"not: ranks come from the launcher; start distclm through torchrun, the deepspeed launcher "
                        f"or accelerate launch (launchers/), not with hand-written rank variables")
    rank, local_rank = _int_env(env, "RANK"), _int_env(env, "LOCAL_RANK")
    local_var = next((k for k in LOCAL_WORLD_VARS if k in env), None)
    local_world = _int_env(env, local_var) if local_var else world
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}) on {host}")
    if not 0 <= local_rank < local_world:
        raise UserError(f"LOCAL_RANK={local_rank} is outside 0..{local_world - 1} ({local_var or 'WORLD_SIZE'}="
                        f"{local_world}) on {host}")
    node = next((env[k] for k in NODE_RANK_VARS if k in env), host)
    return RankInfo(rank, world, local_rank, local_world, node, host)


def launcher_node_count(env: Mapping[str, str] | None = None) -> int | None:
    env = os.environ if env is None else env
    var = next((k for k in NODE_COUNT_VARS if k in env), None)
    return _int_env(env, var) if var else None


def check_topology(infos: list[RankInfo], announced_nodes: int | None = None) -> str:
    """WORLD_SIZE = nodes x processes per node, ranks unique; -> a one-line summary. Pure: every rank gets the same."""
    world = infos[0].world
    where = {i.rank: i.where for i in infos}
    worlds = {i.world for i in infos}
    if len(worlds) > 1:
        odd = [i for i in infos if i.world != world]
        raise UserError(f"the ranks disagree on WORLD_SIZE ({sorted(worlds)}): {odd[0].where} says {odd[0].world}, "
                        f"{infos[0].where} says {world}; start every node with the same node count and "
                        f"processes per node")
    ranks = sorted(i.rank for i in infos)
    if ranks != list(range(world)):
        dup = sorted({r for r in ranks if ranks.count(r) > 1})
        raise UserError(f"ranks {dup} were given to more than one process ({', '.join(where[r] for r in dup)}); "
                        f"ranks must come from one launcher per node, not be set by hand")
    nodes: dict[str, list[RankInfo]] = {}
    for i in sorted(infos, key=lambda i: i.rank):
        nodes.setdefault(i.node, []).append(i)
    for node, members in nodes.items():
        hosts = sorted({m.host for m in members})
        if len(hosts) > 1 and node not in hosts:
            raise UserError(f"node rank {node} was given to launchers on {len(hosts)} hosts ({', '.join(hosts)}): "
                            f"give each node its own node rank (or let the c10d rendezvous assign them)")
    per_node = {node: len(members) for node, members in nodes.items()}
    nproc = infos[0].local_world
    for node, members in nodes.items():
        declared = {m.local_world for m in members}
        if declared != {nproc} or len(members) != nproc:
            raise UserError(f"{members[0].where} runs {len(members)} process(es) (its LOCAL_WORLD_SIZE says "
                            f"{sorted(declared)}) while {infos[0].where} runs {nproc}: every node must start the "
                            f"same number (NPROC_PER_NODE), so WORLD_SIZE = nodes x processes per node")
        local = sorted(m.local_rank for m in members)
        if local != list(range(nproc)):
            raise UserError(f"{members[0].where} has local ranks {local}, expected 0..{nproc - 1}: two launchers "
                            f"were started with the same node rank")
    if len(nodes) * nproc != world:
        raise UserError(f"WORLD_SIZE={world} but {len(nodes)} node(s) x {nproc} process(es) per node joined "
                        f"({per_node}); the launcher's --nnodes and --nproc_per_node disagree with what started")
    if announced_nodes is not None and announced_nodes != len(nodes):
        raise UserError(f"the launcher announced {announced_nodes} node(s) but ranks came from {len(nodes)}: "
                        f"{sorted(nodes)}; give every node a distinct node rank")
    hosts = [f"{members[0].host}: ranks {members[0].rank}-{members[-1].rank}" if len(members) > 1
             else f"{members[0].host}: rank {members[0].rank}" for members in nodes.values()]
    shown = "; ".join(hosts[:4]) + (f"; ... {len(hosts) - 4} more" if len(hosts) > 4 else "")
    return f"world {world} = {len(nodes)} node(s) x {nproc} process(es) per node ({shown})"


def missing_probes(probe_dir: Path, world: int, wait_s: float = PROBE_WAIT_S) -> list[int]:
    """Ranks whose probe file rank 0 cannot see in `probe_dir`, after waiting up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        missing = [r for r in range(world) if not (probe_dir / f"rank-{r}.json").exists()]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.25)


def shared_dir_message(run_dir: Path, missing: list[int], infos: list[RankInfo]) -> str:
    by_rank = {i.rank: i for i in infos}
    nodes = sorted({by_rank[r].where for r in missing})
    ranks = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
    return (f"the run dir {run_dir} is not the same folder on every node: rank 0 ({by_rank[0].where}) cannot see "
            f"the probe files of rank(s) {ranks} on {', '.join(nodes)}; put --run.dir (and --data.dir) on storage "
            f"that every node mounts at the same path (NFS, Lustre, a shared PVC)")


VERSIONED = ("distclm", "torch", "transformers", "deepspeed")


def versions() -> dict[str, str]:
    """The versions this rank runs, of the packages every rank must share ("not installed" when absent)."""
    from importlib import metadata

    from distclm import __version__

    found = {"distclm": __version__}
    for name in VERSIONED[1:]:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def check_versions(infos: list[RankInfo], found: list[dict[str, str]]) -> None:
    """`found[i]`: rank infos[i]'s versions. The first rank (in rank order) that differs from rank 0 is named with
    its host and each package that differs. Pure: every rank gets the same verdict."""
    pairs = sorted(zip(infos, found), key=lambda p: p[0].rank)
    (first, ref), odd = pairs[0], [(i, v) for i, v in pairs[1:] if v != pairs[0][1]]
    if not odd:
        return
    info, theirs = odd[0]
    diff = ", ".join(f"{k} {theirs.get(k)} (rank {first.rank}: {ref.get(k)})" for k in VERSIONED
                     if theirs.get(k) != ref.get(k))
    more = f"; {len(odd) - 1} more rank(s) differ too" if len(odd) > 1 else ""
    raise UserError(f"rank {info.rank} on {info.where} runs {diff} while rank {first.rank} runs on {first.where}"
                    f"{more}: every rank must run the same {', '.join(VERSIONED)}; install the same versions on "
                    f"every node (`distclm doctor` lists them)")


def check_same_versions() -> None:
    """check_versions across the process group, collectively (nothing to compare on one process)."""
    if dist.world_size() == 1 or dist.group_rank_and_size() is None:
        return
    gathered = dist.all_gather_object((asdict(rank_info()), versions()))
    check_versions([RankInfo(**i) for i, _ in gathered], [v for _, v in gathered])


def check_launch(run_dir: Path) -> str | None:
    """The checks above, collectively, once the process group exists. -> the topology summary (None: one process)."""
    mine = rank_info()
    if mine.world == 1:
        return None
    group = dist.group_rank_and_size()
    if group is None:
        raise UserError(f"WORLD_SIZE={mine.world} but no process group was formed")
    if group != (mine.rank, mine.world):
        raise UserError(f"the process group says rank {group[0]} of {group[1]} but the launcher's "
                        f"environment says RANK={mine.rank} WORLD_SIZE={mine.world} on {mine.host}")
    infos = [RankInfo(**g) for g in dist.all_gather_object(asdict(mine))]
    summary = check_topology(infos, launcher_node_count())

    # The probe folder is new for each launch (rank 0's nonce): files left by an earlier launch prove nothing.
    nonce = dist.broadcast_object(uuid.uuid4().hex if mine.rank == 0 else None)
    probe_dir = Path(run_dir) / ".launch-probe" / nonce
    probe_dir.mkdir(parents=True, exist_ok=True)
    (probe_dir / f"rank-{mine.rank}.json").write_text(json.dumps(asdict(mine)) + "\n", encoding="utf-8")
    dist.barrier()
    verdict = None
    if mine.rank == 0:
        missing = missing_probes(probe_dir, mine.world)
        verdict = shared_dir_message(Path(run_dir), missing, infos) if missing else ""
        shutil.rmtree(probe_dir.parent, ignore_errors=True)
    verdict = dist.broadcast_object(verdict)
    if verdict:
        raise UserError(verdict)
    summary += f"; run dir {run_dir} shared"
    if mine.rank == 0:
        print(f"launch: {summary}", flush=True)
    return summary
