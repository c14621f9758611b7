"""The environment of every child process the tests start."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOOKS = Path(__file__).resolve().parent / "hooks"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def offline() -> None:
    """Offline and deterministic wherever the suite runs: no hub probe, no user cache that could hold a real
    `gpt2` download and make the "hub id offline" tests pass for the wrong reason. Set once, by conftest."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HOME"] = os.path.join(tempfile.gettempdir(), f"distclm-tests-hf-home-{os.getpid()}")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def child_env(hooks: dict[str, str] | None = None, **extra: str) -> dict:
    """This process's environment for a child: this checkout importable, one thread per process, the DeepSpeed
    op cache shared, no launcher variables of our own, stacks printed on a fatal signal. `hooks`: DISTCLM_TEST_*
    settings of hooks/sitecustomize.py (fault injection), which the child then loads at start-up."""
    env = dict(os.environ)
    for key in LAUNCHER_VARS:
        env.pop(key, None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONFAULTHANDLER", "1")  # a fatal signal (SIGABRT from a test that gave up) prints stacks
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "distclm" / "torch_extensions"))
    path = [str(REPO)]
    if hooks:
        path.insert(0, str(HOOKS))
        env.update(hooks)
    env["PYTHONPATH"] = os.pathsep.join(path + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env
