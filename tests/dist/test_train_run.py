"""A whole `distclm train` on 2 gloo processes: data order, outputs of the run dir, console, user errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from tests.support.cli import command, run_cli
from tests.support.env import REPO, child_env
from tests.support.runs import block_ids, read_metrics

MICRO, WORLD = 4, 2
GLOBAL = MICRO * WORLD


@pytest.fixture(scope="module")
def small_blocks(tmp_path_factory):
    out = tmp_path_factory.mktemp("small64")
    run_cli("prepare", *["--data.source=pydoc", f"--data.dir={out}", "--data.block_size=64",
                               "--data.max_docs=6", "--data.val_fraction=0.3"], nproc=1, check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    return out, manifest


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory, small_blocks):
    data, manifest = small_blocks
    run_dir = tmp_path_factory.mktemp("run") / "r"
    proc = run_cli("train", *[f"--data.dir={data}", "--model.name=gpt2-tiny", f"--run.dir={run_dir}",
                                        f"--train.micro_batch_size={MICRO}", "--train.epochs=2", "--train.lr=1e-3",
                                        "--log.block_ids=true", "--log.every_steps=5", "--log.interval_s=0"], nproc=WORLD, check=True)
    return run_dir, manifest, proc


def test_each_epoch_sees_every_block_at_most_once_across_ranks(two_epoch_run):
    run_dir, manifest, _ = two_epoch_run
    n = manifest["splits"]["train"]["n_blocks"]
    steps_per_epoch = n // GLOBAL
    assert steps_per_epoch >= 5  # a real multi-step epoch
    per_rank = [block_ids(run_dir, r) for r in range(WORLD)]
    assert sorted(per_rank[0]) == list(range(1, 2 * steps_per_epoch + 1))
    epochs = []
    for e in range(2):
        steps = range(e * steps_per_epoch + 1, (e + 1) * steps_per_epoch + 1)
        ids = [i for s in steps for r in range(WORLD) for i in per_rank[r][s]]
        assert all(len(per_rank[r][s]) == MICRO for s in steps for r in range(WORLD))
        assert len(ids) == len(set(ids)) == steps_per_epoch * GLOBAL  # no block twice in an epoch
        assert n - len(ids) < GLOBAL and all(0 <= i < n for i in ids)  # < one global batch left out
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # a new permutation each epoch
    # The ranks take disjoint parts of every global batch.
    assert not set(per_rank[0][1]) & set(per_rank[1][1])


def test_metrics_records_follow_the_contract(two_epoch_run):
    run_dir, manifest, _ = two_epoch_run
    steps_per_epoch = manifest["splits"]["train"]["n_blocks"] // GLOBAL
    total = 2 * steps_per_epoch
    train = read_metrics(run_dir, "train")
    expected_steps = sorted({1, total} | {s for s in range(1, total + 1) if s % 5 == 0})
    assert sorted(train) == expected_steps  # every 5 steps, and the first and last always
    keys = {"type", "step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device",
            "mfu", "mem_bytes", "elapsed_s"}
    for r in train.values():
        assert keys <= set(r)
        assert r["epoch"] == pytest.approx(r["step"] / steps_per_epoch)
        assert r["mfu"] is None  # CPU and no --log.peak_tflops: unknown, not a made-up number
        assert 0 < r["loss"] < 12 and r["grad_norm"] > 0 and r["mem_bytes"] > 0
    last = train[total]
    assert last["tokens_per_s_per_device"] == pytest.approx(last["tokens_per_s"] / WORLD)
    assert train[total]["loss"] < train[1]["loss"]
    evals = read_metrics(run_dir, "eval")
    assert sorted(evals) == [steps_per_epoch, total]  # the tutorial's evaluation_strategy="epoch"
    n_val = manifest["splits"]["validation"]["n_blocks"]
    for r in evals.values():
        assert r["eval_tokens"] == n_val * 63
        assert r["eval_perplexity"] == pytest.approx(np.exp(r["eval_loss"]))


def test_run_dir_outputs(two_epoch_run):
    run_dir, _, _ = two_epoch_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"wall_s", "tokens", "tokens_per_s", "final_loss", "steps"} <= set(summary)
    assert summary["tokens"] == summary["steps"] * GLOBAL * 64
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "strategy: ddp" in (run_dir / "config.yaml").read_text()
    assert not (run_dir / "ds_config.json").exists()  # DDP: no DeepSpeed config


def test_plain_console_is_rank0_only_and_ascii(two_epoch_run):
    _, manifest, proc = two_epoch_run
    total = 2 * (manifest["splits"]["train"]["n_blocks"] // GLOBAL)
    step_lines = [line for line in proc.out.splitlines() if line.startswith("step ")]
    # --log.interval_s=0: a line per step, printed by rank 0 only (not once per rank).
    assert len(step_lines) == total
    assert all(line.isascii() and "\x1b" not in line and "\r" not in line for line in proc.out.splitlines())
    assert re.match(r"step 1/\d+ epoch 0\.\d+ loss \d+\.\d+ lr .* tok/s .* mfu n/a mem .* eta ", step_lines[0])
    assert sum("eval step" in line for line in proc.out.splitlines()) == 2


def test_terminal_gets_the_rich_panel(small_blocks, tmp_path):
    data, _ = small_blocks
    cmd = command("train", [f"--data.dir={data}", "--model.name=gpt2-tiny", f"--run.dir={tmp_path / 'r'}",
                                   "--train.max_steps=3", "--train.micro_batch_size=2"], 1)
    # `script` gives the child a pseudo-terminal, as a user's shell would.
    proc = subprocess.run(["script", "-qec", " ".join(cmd), "/dev/null"], env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "distclm train" in proc.stdout and "tok/s/dev" in proc.stdout and "MFU" in proc.stdout
    assert "\x1b[" in proc.stdout  # a live, coloured panel rather than plain lines
    assert not re.search(r"^step 1/3 epoch", proc.stdout, re.M)


@pytest.mark.parametrize("flags, message", [
    (["--train.backend=nccl"], "--train.backend=nccl needs CUDA"),
    (["--model.name=/nonexistent/model"], "--model.name=/nonexistent/model"),
    (["--train.micro_batch_size=4096"], "fewer than one global batch"),
    (["--train.precision=bf16"], "--train.precision=bf16 needs a GPU"),
    (["--train.offload=optimizer"], "needs a ZeRO strategy"),
])
def test_user_errors_are_one_line_and_exit_2(small_blocks, tmp_path, flags, message):
    data, _ = small_blocks
    args = [f"--data.dir={data}", "--model.name=gpt2-tiny", f"--run.dir={tmp_path / 'r'}", *flags]
    proc = subprocess.run([sys.executable, "-m", "distclm.cli", "train", *args], env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and message in lines[-1]


def test_block_size_above_model_positions_is_refused(tmp_path):
    # A tokenizer folder that allows 2048-token blocks, and the 1024-position gpt2-tiny.
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(REPO / "distclm" / "assets" / "gpt2"))
    tok.model_max_length = 4096
    tok.save_pretrained(tmp_path / "tok")
    data = tmp_path / "d"
    run_cli("prepare", *["--data.source=pydoc", f"--data.dir={data}", "--data.block_size=2048",
                               f"--data.tokenizer={tmp_path / 'tok'}"], nproc=1, check=True)
    proc = subprocess.run([sys.executable, "-m", "distclm.cli", "train", f"--data.dir={data}",
                           "--model.name=gpt2-tiny", f"--run.dir={tmp_path / 'r'}"],
                          env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--model.name=gpt2-tiny: it handles at most 1024 positions (max_position_embeddings of its gpt2 " \
           "config) but" in proc.stderr and "has blocks of 2048 tokens" in proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
