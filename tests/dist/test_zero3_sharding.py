"""ZeRO-3 that really shards: the model is built and loaded partitioned (zero.Init), checkpoints are the shards
alone, and a pretrained folder loads to exactly its own weights. Plus other architectures' folders refused in
their own terms when they cannot take the data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.support.cli import command
from tests.support.env import REPO, child_env
from tests.support.runs import train, weights


def probe(data, model: str, strategy: str, out) -> list[dict]:
    """tests/support/probe_setup.py on 2 processes: what each rank holds right after distclm's set-up."""
    cmd = command("train", [f"--data.dir={data}", f"--model.name={model}", f"--train.strategy={strategy}",
                            "--train.micro_batch_size=4"], nproc=2)
    cmd[cmd.index("-m", cmd.index("--master_port")):cmd.index("train") + 1] = [str(REPO / "tests" / "support" /
                                                                                      "probe_setup.py")]
    out.mkdir()
    proc = subprocess.run(cmd, env=child_env(DISTCLM_PROBE_OUT=str(out)), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A pretrained-style folder of another architecture: llama-tiny saved with save_pretrained (seed 7)."""
    from distclm.data.tokenize import load_hf_tokenizer
    from distclm.model import build_model

    out = tmp_path_factory.mktemp("llama-folder")
    build_model("llama-tiny", 7).save_pretrained(out)
    load_hf_tokenizer("gpt2")[0].save_pretrained(out)
    return out


@pytest.mark.parametrize("model", [pytest.param("gpt2-tiny", marks=pytest.mark.extended), "llama folder"])
def test_right_after_set_up_each_rank_holds_about_half_the_parameters(pydoc_blocks, llama_folder, model, tmp_path):
    name = str(llama_folder) if model == "llama folder" else model
    ranks = probe(pydoc_blocks, name, "zero3", tmp_path / "zero3")
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        print(f"{model} rank {r['rank']}: {r['local']:,} of {r['total']:,} elements ({r['local'] / r['total']:.3f})")
        assert r["local"] <= 0.55 * r["total"]
    ddp = probe(pydoc_blocks, name, "ddp", tmp_path / "ddp")
    assert all(r["local"] == r["total"] == ranks[0]["total"] for r in ddp)  # DDP: a full copy each


@pytest.mark.parametrize("strategy", ["zero2", pytest.param("zero3", marks=pytest.mark.extended)])
def test_in_fp32_the_master_partition_is_the_weights_not_a_second_copy(pydoc_blocks, tmp_path, strategy):
    """DeepSpeed clones each rank's partition into an fp32 master even when the weights are fp32 already; distclm
    makes the master the partition itself (for 2 ranks: a quarter of the model's fp32 bytes saved per rank)."""
    ranks = probe(pydoc_blocks, "gpt2-tiny", strategy, tmp_path / strategy)
    assert [r["master_copy"] for r in ranks] == [0, 0]


def test_pretrained_folder_loads_partitioned_to_exactly_its_weights(pydoc_blocks, llama_folder, tmp_path):
    """One ZeRO-3 step at lr 1e-30 moves no fp32 weight: the export must be the folder's weights, bit for bit."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    train(2, run, pydoc_blocks, "--train.max_steps=1", "--train.lr=1e-30", "--train.strategy=zero3", "--eval.at_end=false",
          "--train.micro_batch_size=4", model=str(llama_folder))
    ckpt = run / "checkpoints" / "step-1"
    assert (ckpt / "deepspeed").is_dir() and not list((ckpt / "model").glob("*.safetensors"))  # shards only
    exported = weights(run / "export")
    plain = AutoModelForCausalLM.from_pretrained(llama_folder).state_dict()
    assert exported.keys() == plain.keys()
    assert all(torch.equal(exported[k], plain[k]) for k in plain)


@pytest.mark.parametrize("change, expect", [
    ({"max_position_embeddings": 32}, "it handles at most 32 positions (max_position_embeddings of its llama config)"),
    ({"vocab_size": 1000}, "its vocabulary has 1,000 tokens (vocab_size of its llama config)"),
])
def test_a_model_that_cannot_take_the_data_is_one_line_in_its_own_terms(pydoc_blocks, tmp_path, change, expect):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, **{"vocab_size": 50257, "max_position_embeddings": 1024,
                                                            **change})
    folder = tmp_path / "m"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    proc = subprocess.run([sys.executable, "-m", "distclm.cli", "train", f"--data.dir={pydoc_blocks}",
                           f"--model.name={folder}", f"--run.dir={tmp_path / 'r'}"], env=child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"distclm: error: --model.name={folder}: {expect}")
    assert not (tmp_path / "r").exists()  # refused before anything was set up
