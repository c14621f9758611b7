"""Rule 8 (issue 28): ranks that run other versions of distclm, torch, transformers or deepspeed are refused at
start-up, the odd rank named with its host. Real 2-process jobs; rank 1's version faked by a test hook."""

from __future__ import annotations

import pytest

from tests.support.cli import run_cli
from tests.support.env import child_env


@pytest.mark.parametrize("package", ["torch", "deepspeed"])
def test_a_rank_with_another_version_is_named(pydoc_blocks, tmp_path, package):
    env = child_env(hooks={"DISTCLM_TEST_FAKE_VERSION": f"1:{package}=9.9.9"})
    r = run_cli("train", f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", f"--run.dir={tmp_path / 'r'}",
                "--train.max_steps=1", "--train.micro_batch_size=4", nproc=2, env=env, timeout=300)
    # torchrun passes on the first failing rank's code; every rank raises the same one line
    assert r.code == 2, (r.out[-2000:], r.err[-3000:])
    lines = [ln for ln in r.err.splitlines() if ln.startswith("distclm: error: ")]
    assert lines and lines[0].startswith(f"distclm: error: rank 1 on host ") and f"runs {package} 9.9.9" in lines[0]
    assert "Traceback" not in r.err
    assert not (tmp_path / "r" / "config.yaml").exists()  # refused before the run dir was claimed
