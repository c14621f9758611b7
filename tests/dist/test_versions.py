"""Rule 8 (issue 28): ranks that run other versions of distclm, torch, transformers or deepspeed are refused at
start-up, the odd rank named with its host. Real 2-process jobs, started by hand as a launcher would (each rank's
own exit code); rank 1's version faked by a test hook."""

from __future__ import annotations

import sys

import pytest

from tests.support.cli import free_port
from tests.support.ranks import rank_env, run_ranks


@pytest.mark.parametrize("package", ["torch", "deepspeed"])
def test_a_rank_with_another_version_is_named(pydoc_blocks, tmp_path, package):
    port, hook = free_port(), {"DISTCLM_TEST_FAKE_VERSION": f"1:{package}=9.9.9"}
    cmd = [sys.executable, "-m", "distclm.cli", "train", f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny",
           f"--run.dir={tmp_path / 'r'}", "--train.max_steps=1", "--train.micro_batch_size=4"]
    done = run_ranks([cmd, cmd], [rank_env(r, 2, port, hook) for r in range(2)], timeout=240)
    for p in done:  # every rank computes the same verdict: the same one line, exit 2
        assert p.returncode == 2, p.stderr[-3000:]
        assert "Traceback" not in p.stderr
        errors = [line for line in p.stderr.splitlines() if line.startswith("distclm: error: ")]
        assert len(errors) == 1, p.stderr[-3000:]
        assert errors[0].startswith("distclm: error: rank 1 on node 1 on ") and f"runs {package} 9.9.9" in errors[0]
    assert not (tmp_path / "r" / "config.yaml").exists()  # refused before the run dir was claimed
