"""Load a causal LM and its tokenizer: a hub id, a local Hugging Face folder, a run dir, or a preset.

No distributed code here (torchtitan's rule): parallelism is applied in accel.py.
"""

from __future__ import annotations

from pathlib import Path

from distclm.errors import UserError

# Named architectures built from config with random init: offline, for tests, the demo and benchmarks.
ARCH_PRESETS = {
    # 2 layers, 128 wide, GPT-2 vocab: ~6.96 M parameters (6.43 M of them the embedding). No dropout:
    # a tiny model does not need it, and runs on 1 and N processes then compute the same numbers.
    "gpt2-tiny": dict(n_layer=2, n_embd=128, n_head=4, n_positions=1024,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    # DistilGPT2's exact shape: 6 layers, 768 wide, 12 heads, 1024 positions (~81.9 M parameters).
    "distilgpt2-arch": dict(n_layer=6, n_embd=768, n_head=12, n_positions=1024),
}


def resolve_model_dir(name: str) -> str:
    """A run dir means its export (if present) or its newest complete checkpoint's weights."""
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.yaml").exists() and not (path / "config.json").exists():
        if (path / "export" / "config.json").exists():
            return str(path / "export")
        ckpts = sorted((p for p in (path / "checkpoints").glob("step-*") if (p / "COMPLETE").exists()),
                       key=lambda p: int(p.name.split("-")[1]))
        for ckpt in reversed(ckpts):
            if (ckpt / "model" / "config.json").exists():
                return str(ckpt / "model")
        raise UserError(f"--model.name={name}: a run dir with no export/ and no complete checkpoint with weights; "
                        f"run `distclm export {name}` or train it first")
    return name


def is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def load_model(name: str, trust_remote_code: bool = False, dtype=None):
    """The model (torch.nn.Module, fp32 unless `dtype`), random init for presets."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if name in ARCH_PRESETS:
        config = GPT2Config(vocab_size=50257, bos_token_id=50256, eos_token_id=50256, loss_type="ForCausalLM",
                            **ARCH_PRESETS[name])
        config._attn_implementation = "sdpa"
        return _causal_lm_loss(GPT2LMHeadModel(config))
    name = resolve_model_dir(name)
    local = is_local(name)
    if local and not (Path(name).expanduser() / "config.json").exists():
        raise UserError(f"--model.name={name}: not a Hugging Face model folder (no config.json), a run dir, "
                        f"or a preset ({', '.join(ARCH_PRESETS)})")
    if not local:
        from distclm.hub import ensure_offline_if_unreachable

        ensure_offline_if_unreachable()
    try:
        return _causal_lm_loss(AutoModelForCausalLM.from_pretrained(
            str(Path(name).expanduser()) if local else name, trust_remote_code=trust_remote_code,
            dtype=dtype or torch.float32, attn_implementation="sdpa"))
    except Exception as exc:  # noqa: BLE001 - hub and file errors come in many types
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        if local:
            raise UserError(f"--model.name={name}: cannot load the model from this folder ({first})") from None
        from distclm.hub import hub_reachable, offline_hint

        why = offline_hint("model", "--model.name") if not hub_reachable() else first
        if "trust_remote_code" in first:
            why = f"{first}; pass --model.trust_remote_code=true only if you trust its code"
        raise UserError(f"--model.name={name}: cannot load it from the Hugging Face Hub: {why}; "
                        f"or use a preset: --model.name=gpt2-tiny") from None


def _causal_lm_loss(model):
    """Name the loss transformers would fall back to anyway, so it does not warn about it on every rank."""
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def load_model_tokenizer(name: str, data_tokenizer: str = "gpt2"):
    """The tokenizer that goes with the model: its own (folder/hub), else the data's (presets)."""
    from distclm.data.tokenize import load_hf_tokenizer

    if name in ARCH_PRESETS:
        return load_hf_tokenizer(data_tokenizer)[0]
    resolved = resolve_model_dir(name)
    try:
        return load_hf_tokenizer(resolved)[0]
    except UserError:
        return load_hf_tokenizer(data_tokenizer)[0]


def n_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
