"""Hugging Face folders written one tensor at a time: sharded safetensors in bounded memory that load as is."""

from __future__ import annotations

import json

import pytest
import torch

from distclm.hf_folder import ShardWriter, lazy_shard_tensors, write_generation_config, write_metadata, write_weights


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_sharded_folder_loads_with_from_pretrained_and_memory_stays_bounded(tmp_path, preset):
    from transformers import AutoModelForCausalLM

    from distclm.config import GenConfig
    from distclm.data.tokenize import load_hf_tokenizer
    from distclm.model import build_model

    model = build_model(preset, 0)
    state = [(k, v.detach().clone()) for k, v in model.state_dict().items()]
    largest = max(v.numel() * v.element_size() for _, v in state)
    shard_bytes = 4 * 2**20  # 4 MB: several files for a ~27-53 MB model
    folder = tmp_path / "hf"
    writer = write_weights(folder, iter(_dedup(state)), shard_bytes)
    write_metadata(folder, model.config, load_hf_tokenizer("gpt2")[0], GenConfig())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    # Bounded: at most one output shard plus the tensor being added, never the whole model.
    assert writer.peak_bytes <= shard_bytes + largest < writer.total_bytes
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def _dedup(pairs):
    """What the engine's full_state_dict yields: each tied tensor once (first name)."""
    seen = set()
    for name, tensor in pairs:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            yield name, tensor


def test_one_shard_is_model_safetensors(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add("a", torch.ones(3))
    writer.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_lazy_zero_tensors_are_read_once_per_tied_weight():
    class Lazy:
        def __init__(self, value):
            self.value, self.reads = value, 0

        def contiguous(self):
            self.reads += 1
            return self.value

    wte = Lazy(torch.ones(2, 2))
    lazy = {"_orig_mod.transformer.wte.weight": wte, "lm_head.weight": wte, "h.bias": Lazy(torch.zeros(2))}
    out = list(lazy_shard_tensors(lazy))
    assert [n for n, _ in out] == ["transformer.wte.weight", "h.bias"] and wte.reads == 1


def test_generation_config_takes_special_ids_from_the_tokenizer(tmp_path):
    from distclm.config import GenConfig

    class Tok:  # a tokenizer that is not GPT-2's
        eos_token_id, bos_token_id, pad_token_id = 2, 1, 0

    write_generation_config(GenConfig(), Tok(), tmp_path)
    g = json.loads((tmp_path / "generation_config.json").read_text())
    assert (g["eos_token_id"], g["bos_token_id"], g["pad_token_id"]) == (2, 1, 0)
    assert (g["do_sample"], g["top_k"], g["top_p"], g["max_new_tokens"]) == (True, 50, 0.95, 100)


def test_a_greedy_run_saves_a_generation_config_without_sampling_settings(tmp_path):
    """--gen.do_sample=false: transformers refuses to save top_p/top_k without sampling (every checkpoint failed)."""
    from distclm.config import GenConfig

    class Tok:
        eos_token_id, bos_token_id, pad_token_id = 2, 1, 0

    write_generation_config(GenConfig(do_sample=False), Tok(), tmp_path)
    g = json.loads((tmp_path / "generation_config.json").read_text())
    assert g["do_sample"] is False and g["max_new_tokens"] == 100
    assert "top_p" not in g or g["top_p"] in (None, 1.0)

