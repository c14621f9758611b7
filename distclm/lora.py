"""LoRA through peft: low-rank adapters on a frozen base model, with every strategy (ddp, zero1-3).

    --lora.r=8 [--lora.alpha=16 --lora.dropout=0.0 --lora.target_modules=auto|q_proj,v_proj]

The adapters are created by `peft.get_peft_model` (under ZeRO-3 on the partitioned base: peft reads the
full shapes from DeepSpeed's `ds_shape`), from the run's seed, so every rank and strategy starts from
the same adapter. Only adapter parameters are trainable, so only they (and their optimizer state) are
checkpointed. The export merges W + (alpha/r) B A one layer at a time with peft's own `get_delta_weight`
(export/, what `transformers.pipeline` loads) and writes the adapter alone (export/adapter/, what
`peft.PeftModel.from_pretrained(base, ...)` loads).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from distclm.errors import UserError, first_line

ADAPTER = "adapter"


def enabled(lora) -> bool:
    return lora.r > 0


def apply_lora(model, lora, seed: int):
    """`model` with LoRA adapters (a peft model), or `model` itself when --lora.r=0."""
    if not enabled(lora):
        return model
    import torch
    from peft import LoraConfig, get_peft_model

    targets = _default_targets(model) if lora.target_modules == "auto" else \
        [t.strip() for t in lora.target_modules.split(",") if t.strip()]
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # lora_A's random init: the same on every rank and under every strategy
    try:
        with warnings.catch_warnings():  # "fan_in_fan_out ... Conv1D ... Setting it to True": peft handles GPT-2
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft asks transformers
            return get_peft_model(model, config)
    except ValueError as exc:
        first = first_line(exc, 200)
        if targets is None:
            raise UserError(f"--lora.target_modules=auto: peft has no default target modules for model type "
                            f"{model.config.model_type!r} ({first}); name them, e.g. --lora.target_modules=q_proj,v_proj"
                            ) from None
        raise UserError(f"--lora.target_modules={lora.target_modules}: {first}") from None


def _default_targets(model) -> list[str] | None:
    """peft's default target modules for the model type, read from peft's own table (None: it has none). peft
    itself looks them up only after converting a MoE model's adapter config to transformers 5's expert layout,
    and then finds none for Mixtral or Qwen2-MoE ("No `target_modules` passed"): so they are passed explicitly."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    found = DEFAULTS.get(getattr(model.config, "model_type", None))
    return list(found) if isinstance(found, (list, tuple, set)) else found


def base_model(model):
    """The Hugging Face model under a peft model (itself when there is no adapter)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_lora_layer(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def merged_layer(prefix: str, module) -> list[tuple[str, object]]:
    """A LoRA layer's tensors as the base model names them, its weight merged: W + scaling * B A (peft's delta,
    which knows GPT-2's transposed Conv1D). Called with the layer's parameters gathered."""
    base = module.get_base_layer()
    out = [(f"{prefix}.weight", (base.weight.detach() + module.get_delta_weight("default")).cpu().clone())]
    if getattr(base, "bias", None) is not None:
        out.append((f"{prefix}.bias", base.bias.detach().cpu().clone()))
    return out


def base_name(name: str) -> str:
    """A peft model's tensor name -> the base model's (base_model.model.x.base_layer.weight -> x.weight)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def save_adapter(model, tensors: dict, out: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's names), from the adapter's tensors as gathered under
    the peft model's own names (so under ZeRO-3 they are full, not the empty local placeholders)."""
    model.save_pretrained(str(out), state_dict=tensors)
