"""This machine's numbers for the plan, measured once and cached in ~/.cache/distclm/plan-host.json.

    baseline_bytes  peak resident memory of a fresh process that imported what a training rank imports
                    (torch, transformers, accelerate, DeepSpeed, distclm) and ran one rank of distclm's
                    Engine (ddp) around a model of two 64 x 64 layers: set-up, a step, a checkpoint; less
                    that model's states. The part of every rank's peak that no model or batch explains.
    baseline_zero_bytes  the same process's peak after doing it again under ZeRO-2: what DeepSpeed's own
                    modules, groups and buffers add to a ZeRO rank
    matmul_tflops   sustained fp32 FLOP/s of one 1024 x 1024 x 1024 matmul on this process's threads
                    (2 * 1024^3 FLOPs per call), the CPU's "device throughput"

The cache is keyed by the versions of python, torch, transformers and deepspeed and the thread count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def cache_path() -> Path:
    return Path(os.environ.get("DISTCLM_CACHE", Path.home() / ".cache" / "distclm")) / "plan-host.json"


def _key() -> list:
    from importlib.metadata import version

    def v(name: str) -> str:
        try:
            return version(name)
        except Exception:  # noqa: BLE001 - not installed: part of the key all the same
            return "none"

    return [4, sys.version.split()[0], v("torch"), v("transformers"), v("deepspeed"),
            os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))]


# What a launcher tells its ranks: the probe is one process of its own, never a member of the caller's job (it
# would try to join the caller's rendezvous and wait there until its timeout).
LAUNCHER_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_", "ROLE_", "MASTER_",
                     "TORCHELASTIC_", "CROSS_", "NODE_RANK", "ACCELERATE_", "PET_")


def host_measurements() -> dict:
    """{"baseline_bytes", "matmul_tflops"} of this machine, from the cache or measured now (~20 s, once).

    The ranks of a launch on this machine may all ask at once: a file lock lets one measure while the others wait
    and then read its numbers, so every rank on a host plans with the same ones."""
    import fcntl

    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError:  # a read-only home: measured by each process, not kept
        return _cached() or _measure(path)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _cached() or _measure(path)


def _cached() -> dict | None:
    try:
        cached = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return None
    return cached if cached.get("key") == _key() else None


def _measure(path: Path) -> dict:
    key = _key()
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(Path(__file__).resolve().parent.parent) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))  # the host's baseline: a CPU rank
    proc = subprocess.run([sys.executable, "-m", "distclm.engine.probe"], capture_output=True, text=True, env=env,
                          timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measuring this machine's process baseline failed: {proc.stderr[-2000:]}")
    measured = {**json.loads(lines[-1]), "key": key}
    try:
        from distclm.atomic import atomic_write

        atomic_write(path, (json.dumps(measured) + "\n").encode())
    except OSError:  # a read-only home: measured again next time
        pass
    return measured
