"""The model card from a run dir's files alone (no training): what the metadata says for a hub base model and hub
data, chat data's template, each eval, the setup, and what the scrub removes. The cards of real runs, and their
push: tests/e2e/test_hub_push.py."""

from __future__ import annotations

import json

import yaml

from distclm import model_card


def write_run(root, home, **cfg_extra):
    """A run dir as training leaves it: config.yaml, metrics.jsonl, launch.json, a complete checkpoint's meta."""
    data = root / "data"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({
        "format": "distclm-blocks", "version": 2, "dtype": "uint16", "block_size": 128, "vocab_size": 50257,
        "eos_token_id": 50256, "tokenizer": {"name": "distilgpt2", "sha256": "ab"}, "data_format": "chat",
        "chat_template_sha256": "c0ffee", "chat_template_origin": "the distclm default (ChatML-style)",
        "train_on": "assistant", "overlong": "truncate",
        "source": {"source": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "revision": "main",
                   "max_docs": 5000},
        "splits": {"train": {"n_docs": 4000, "n_tokens": 512000, "n_blocks": 4000},
                   "validation": {"n_docs": 1000, "n_tokens": 128000, "n_blocks": 1000}}}))
    run = home / "runs" / "chat"
    ckpt = run / "checkpoints" / "step-20"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("")
    (ckpt / "meta.json").write_text(json.dumps({"step": 20, "world_size": 16, "strategy": "zero3",
                                                "samples_consumed": 640}))
    cfg = {"model": {"name": "distilgpt2"}, "data": {"dir": str(data)}, "lora": {"r": 0},
           "train": {"strategy": "zero3", "lr": 2e-5, "precision": "bf16", "offload": "none"},
           "eval": {"max_blocks": None}, "hub": {"license": None}, "run": {"dir": str(run)}}
    for key, value in cfg_extra.items():
        section, name = key.split("__")
        cfg[section][name] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    records = [{"type": "train", "step": 19, "loss": 2.5}, {"type": "eval", "step": 10, "epoch": 0.5,
               "eval_loss": 3.0, "eval_perplexity": 20.0855, "eval_tokens": 127000, "eval_blocks": 1000},
               {"type": "eval", "step": 20, "epoch": 1.0, "eval_loss": 2.75, "eval_perplexity": 15.6426,
                "eval_tokens": 127000, "eval_blocks": 1000},
               {"type": "eval", "step": 20, "epoch": 1.0, "eval_loss": 2.7, "eval_perplexity": 14.8797,
                "eval_tokens": 127000, "eval_blocks": 1000},  # a step repeated after a crash: the last counts
               {"type": "train", "step": 20, "loss": 2.25}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "launch.json").write_text(json.dumps({
        "argv": ["distclm", "train", f"--data.dir={data}", f"--run.dir={run}", "--train.strategy=zero3"],
        "launcher": "torchrun", "world_size": 16, "nodes": 2, "procs_per_node": 8, "hardware": "NVIDIA H100 80GB HBM3",
        "versions": {"distclm": "0.1.0", "torch": "2.13.0"}}))
    return run


def test_a_hub_base_and_hub_data_fill_the_metadata_and_every_eval_is_a_row(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    run = write_run(tmp_path, home, hub__license="apache-2.0")
    export = run / "export"
    export.mkdir()
    text = (model_card.write_card(run, export)).read_text()
    meta = ModelCard(text).data.to_dict()
    assert meta == {"library_name": "distclm", "pipeline_tag": "text-generation", "base_model": "distilgpt2",
                    "license": "apache-2.0", "datasets": ["HuggingFaceH4/ultrachat_200k"],
                    "tags": ["distclm", "causal-lm"]}
    assert "- source: `HuggingFaceH4/ultrachat_200k`, split train_sft, revision main, first 5000 documents" in text
    assert "- format: chat; template: the distclm default (ChatML-style) (sha256 c0ffee), loss on assistant" in text
    assert "| train | 4000 | 512000 | 4000 |" in text and "| validation | 1000 | 128000 | 1000 |" in text
    assert "| 10 | 0.5000 | 3.0000 | 20.0855 | 127000 | 1000 |" in text
    assert "| 20 | 1.0000 | 2.7000 | 14.8797 | 127000 | 1000 |" in text and "15.6426" not in text
    assert "Trained 20 optimizer steps (640 blocks); training loss 2.2500 at step 20." in text
    assert "- strategy: zero3; world size 16 (2 node(s) x 8), launched by torchrun" in text
    assert "- hardware: NVIDIA H100 80GB HBM3" in text and "- precision: bf16" in text
    assert "distclm train --data.dir=" in text and "--run.dir=~/runs/chat --train.strategy=zero3" in text
    assert str(home) not in text and "License: not recorded" not in text


def test_a_preset_or_a_folder_is_no_base_model_and_an_unknown_license_is_said(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("gpt2-tiny", str(tmp_path)):
        run = write_run(tmp_path / name.replace("/", "_"), tmp_path / "home" / name.replace("/", "_"),
                        model__name=name)
        text = model_card.render(run, run / "export")
        meta = ModelCard(text).data.to_dict()
        assert "base_model" not in meta and "license" not in meta
        assert "License: not recorded" in text and "--hub.license" in text


def test_scrub_removes_secret_values_token_shapes_and_the_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SOME_API_TOKEN", "abcdefgh12345678")
    monkeypatch.setenv("ANYTHING", "hf_" + "Zz9" * 8)  # a token by its shape, whatever the name
    text = model_card.scrub(f"{tmp_path}/runs/x abcdefgh12345678 hf_{'a1' * 12} {'hf_' + 'Zz9' * 8} {tmp_path}x")
    assert text == f"~/runs/x <redacted> <redacted> <redacted> {tmp_path}x"
    assert model_card._hub_id("distilgpt2") == "distilgpt2" and model_card._hub_id("org/model") == "org/model"
    assert model_card._hub_id("gpt2-tiny") is None and model_card._hub_id(str(tmp_path)) is None
