"""Bad input to `distclm train`: one clear line, exit code 2, nothing corrupted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid

import pytest
from tests.support.cli import run_cli
from tests.support.env import REPO, child_env

BASE = ["--model.name=gpt2-tiny", "--train.micro_batch_size=4", "--log.interval_s=1000", "--eval.max_blocks=16"]


def train(data, run_dir, *extra):
    proc = subprocess.run([sys.executable, "-m", "distclm.cli", "train", f"--data.dir={data}",
                           f"--run.dir={run_dir}", *BASE, *extra], env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    return proc


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture
def data_copy(pydoc_blocks, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(pydoc_blocks, dst)
    return dst


def test_missing_and_incomplete_data_folders(tmp_path, data_copy):
    assert "no such folder" in one_line_error(train(tmp_path / "nope", tmp_path / "r1"))
    (data_copy / "manifest.json").unlink()  # what an interrupted prepare leaves
    line = one_line_error(train(data_copy, tmp_path / "r2"))
    assert "manifest.json: missing" in line and "distclm prepare" in line


def test_shard_checksum_mismatch_names_the_file(tmp_path, data_copy):
    shard = data_copy / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[1000] ^= 0xFF  # one flipped byte, same size
    shard.write_bytes(bytes(raw))
    line = one_line_error(train(data_copy, tmp_path / "r", "--train.max_steps=1"))
    assert str(shard) in line and "sha256 does not match" in line
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_data_of_another_tokenizer_is_refused(tmp_path):
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(REPO / "distclm" / "assets" / "gpt2"))
    tok.add_tokens(["<|distclm-extra-1|>", "<|distclm-extra-2|>"])  # a tokenizer the model does not know
    tok.save_pretrained(tmp_path / "tok")
    data = tmp_path / "d"
    run_cli("prepare", *["--data.source=pydoc", f"--data.dir={data}", "--data.max_docs=5",
                               f"--data.tokenizer={tmp_path / 'tok'}"], nproc=1, check=True)
    line = one_line_error(train(data, tmp_path / "r"))
    assert "its vocabulary has 50,257 tokens" in line and "(50,259 tokens)" in line and "--data.tokenizer" in line


def test_a_run_dir_of_another_configuration_is_refused(pydoc_blocks, tmp_path):
    run_dir = tmp_path / "r"
    ok = train(pydoc_blocks, run_dir, "--train.max_steps=2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = (run_dir / "metrics.jsonl").read_text()
    line = one_line_error(train(pydoc_blocks, run_dir, "--train.max_steps=2", "--train.lr=0.1"))
    assert "holds another configuration" in line and "--train.lr" in line
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing appended, nothing overwritten


def _mount_tmpfs(path, size_mb) -> bool:
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", f"distclm-{uuid.uuid4().hex[:6]}",
                           str(path)], capture_output=True).returncode == 0


def test_out_of_disk_space_while_checkpointing_keeps_the_previous_checkpoint(pydoc_blocks, tmp_path):
    disk = tmp_path / "small"
    # One checkpoint of gpt2-tiny is ~84 MB (weights 28 MB + Adam moments 56 MB): room for one, not two.
    if not _mount_tmpfs(disk, 130):
        pytest.skip("cannot mount a small tmpfs here (needs root); out-of-space path not exercised")
    try:
        run_dir = disk / "run"
        proc = train(pydoc_blocks, run_dir, "--train.max_steps=4", "--train.save_every=2", "--train.keep_last=2")
        line = one_line_error(proc)
        assert "out of disk space writing checkpoint step-4" in line
        assert f"the previous checkpoint {run_dir / 'checkpoints' / 'step-2'} is intact" in line
        ck = run_dir / "checkpoints" / "step-2"
        assert (ck / "COMPLETE").exists() and not list((run_dir / "checkpoints").glob(".tmp-step-*"))
        meta = json.loads((ck / "meta.json").read_text())
        assert meta["step"] == 2
        from safetensors.numpy import load_file

        assert len(load_file(str(ck / "model" / "model.safetensors"))) > 10  # readable, whole
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_rendezvous_port_in_use_is_one_line(pydoc_blocks, tmp_path):
    import os
    import socket

    with socket.socket() as busy:  # a port some other program already listens on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**child_env(), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        proc = subprocess.run([sys.executable, "-m", "distclm.cli", "train", f"--data.dir={pydoc_blocks}",
                               "--model.name=gpt2-tiny", f"--run.dir={tmp_path / 'r'}", "--train.dist_timeout_s=5"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    line = one_line_error(proc)
    assert f"the rendezvous port 127.0.0.1:{port} is already in use on this node" in line
    assert os.path.exists(tmp_path) and not (tmp_path / "r" / "metrics.jsonl").exists()
