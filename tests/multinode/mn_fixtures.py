"""Shared by the multi-node tests: the distrun helpers of tests/dist and a small prepared corpus.

Not a conftest.py: test modules elsewhere import `conftest` by name, and a second conftest.py outside a
package would take that name. Test modules import the fixture from here (`from mn_fixtures import blocks`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
from distrun import run_distclm  # noqa: E402


@pytest.fixture(scope="session")
def blocks(tmp_path_factory) -> Path:
    """30 pydoc documents in 64-token blocks: ~670 train and ~20 validation blocks, prepared in under a second."""
    out = tmp_path_factory.mktemp("mn-data")
    run_distclm(1, "prepare", ["--data.source=pydoc", f"--data.dir={out}", "--data.block_size=64",
                               "--data.max_docs=30", "--data.val_fraction=0.2"])
    return out
