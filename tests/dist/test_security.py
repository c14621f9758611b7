"""Secrets stay out of logs and saved files; remote code stays off unless asked for."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tests.support.env import REPO, child_env


SECRET = "hf_distclmTestSecretToken1234567890"


@pytest.mark.extended  # CI: test_observability.py::test_secrets_never_reach_a_tracker (files, console, trackers)
def test_hf_token_never_reaches_logs_or_saved_files(pydoc_blocks, tmp_path):
    env = {**child_env(), "HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET}
    run_dir = tmp_path / "r"
    outputs = []
    for cmd in (["train", f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", f"--run.dir={run_dir}",
                 "--train.max_steps=2", "--train.micro_batch_size=4", "--log.interval_s=0",
                 "--eval.max_blocks=16"],
                ["doctor"], ["train", "--print-config", f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny"]):
        proc = subprocess.run([sys.executable, "-m", "distclm.cli", *cmd], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(proc.stdout + proc.stderr)
    assert all(SECRET not in out for out in outputs)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_remote_code_is_off_by_default():
    from distclm.config import Config

    assert Config().model.trust_remote_code is False
