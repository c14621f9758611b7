"""Fixtures for the multi-process tests. Runs are cached per session by their arguments,
so a reference (e.g. DDP on 2 processes) is paid once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from distrun import REPO, Runs, child_env


@pytest.fixture(scope="session")
def pydoc_blocks(tmp_path_factory) -> Path:
    """The embedded pydoc corpus prepared in 64-token blocks (~2,000 train blocks)."""
    out = tmp_path_factory.mktemp("pydoc64")
    proc = subprocess.run([sys.executable, "-m", "distclm.cli", "prepare", "--data.source=pydoc",
                           f"--data.dir={out}", "--data.block_size=64", "--data.val_fraction=0.1"],
                          env=child_env(), capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def runs(tmp_path_factory, pydoc_blocks) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), pydoc_blocks)
