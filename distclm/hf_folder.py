"""Hugging Face folders: weights as sharded safetensors written one tensor at a time, plus the model's
config, its tokenizer and the tutorial's sampling defaults, so `transformers.pipeline("text-generation",
model=FOLDER)` loads it as is.

Memory is bounded: `ShardWriter` holds at most one output shard plus the tensor being added (its
`peak_bytes` records it), and its tensors come from a generator (the engine's `full_state_dict`,
which under ZeRO-3 gathers one parameter at a time, or a ZeRO checkpoint's memory-mapped shards).
So at no time is a whole model in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

SHARD_BYTES = 256 * 2**20  # per output file: bounds the writer's memory to this plus the largest tensor


class ShardWriter:
    """Tensors in, `model.safetensors` (one file) or `model-0000i-of-0000n.safetensors` + index out."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder, self.shard_bytes = Path(folder), shard_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._buffer: dict = {}
        self._buffered = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.peak_bytes = 0  # the most tensor bytes this writer held at once

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered + size > self.shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffered += size
        self.total_bytes += size
        self.peak_bytes = max(self.peak_bytes, self._buffered)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self._files):05d}.safetensors"
        save_file(self._buffer, str(self.folder / name), metadata={"format": "pt"})
        self._files.append((name, list(self._buffer)))
        self._buffer, self._buffered = {}, 0

    def finish(self) -> None:
        """Name the files as transformers expects; write the index when there are several."""
        if self._buffer or not self._files:
            self._flush()
        n = len(self._files)
        if n == 1:
            (self.folder / self._files[0][0]).rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, (part, names) in enumerate(self._files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / part).rename(self.folder / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_weights(folder: Path, tensors: Iterable, shard_bytes: int = SHARD_BYTES) -> ShardWriter | None:
    """Consume (name, tensor or None) pairs; write them where tensors are given (rank 0). Every rank must call
    this when the pairs come from a collective generator (ZeRO-3)."""
    writer = None
    for name, tensor in tensors:
        if tensor is None:
            continue
        writer = writer or ShardWriter(folder, shard_bytes)
        writer.add(name, tensor)
    if writer is not None:
        writer.finish()
    return writer


def write_metadata(folder: Path, config, tokenizer, gen) -> None:
    """config.json (use_cache on, whatever training set), the tokenizer, generation_config.json."""
    import copy

    config = copy.deepcopy(config)
    if getattr(config, "use_cache", None) is False:
        config.use_cache = True  # activation checkpointing turned it off for training only
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_generation_config(gen, tokenizer, folder)


def write_generation_config(gen, tokenizer, folder: Path) -> None:
    """The tutorial's sampling defaults, so pipeline("text-generation") samples like `distclm generate`;
    special token ids from the tokenizer (pad = eos when it has no pad token, as `generate` does)."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    # Greedy (--gen.do_sample=false) carries no sampling settings: transformers refuses to save top_p without
    # sampling, which failed every checkpoint of such a run.
    sampling = dict(top_k=gen.top_k, top_p=gen.top_p, temperature=gen.temperature) if gen.do_sample else {}
    GenerationConfig(do_sample=gen.do_sample, **sampling, max_new_tokens=gen.max_new_tokens, bos_token_id=bos,
                     eos_token_id=eos, pad_token_id=pad).save_pretrained(folder)


def check_full_weights(config, folder: Path, expected_bytes: int) -> None:
    """The known ZeRO-3 failure writes each rank's empty placeholders: at least params x dtype bytes must be there."""
    written = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    if written < expected_bytes:
        raise RuntimeError(f"{folder}: {written:,} bytes of weights for {expected_bytes:,} bytes of parameters "
                           f"({config.model_type}); the ZeRO-3 shards were not gathered")


def lazy_shard_tensors(lazy: dict, strip: str = "_orig_mod."):
    """(name, tensor) from DeepSpeed's lazy ZeRO state dict, one materialised at a time, tied copies once."""
    seen = set()
    for name, value in lazy.items():
        if id(value) in seen:  # a tied weight: DeepSpeed lists it under both names
            continue
        seen.add(id(value))
        yield name.removeprefix(strip), value.contiguous()
