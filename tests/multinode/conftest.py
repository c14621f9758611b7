"""Fixtures of the multi-node tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli import run_cli


@pytest.fixture(scope="session")
def blocks(tmp_path_factory) -> Path:
    """30 pydoc documents in 64-token blocks: ~670 train and ~20 validation blocks, prepared in under a second."""
    out = tmp_path_factory.mktemp("mn-data")
    run_cli("prepare", "--data.source=pydoc", f"--data.dir={out}", "--data.block_size=64", "--data.max_docs=30",
            "--data.val_fraction=0.2", check=True)
    return out
