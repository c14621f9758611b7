"""The DeepSpeed JSON of a run, resolved: no "auto" left. Pure: no torch.distributed, no deepspeed import.

    template (distclm/ds_configs/, package data)  <  --train.deepspeed_config (user JSON)  <  distclm's values

distclm's values are the batch (micro x accumulation x world), clipping, precision and ZeRO stage:
they come from the distclm flags, and a user JSON that contradicts one of them is refused, naming
the key and the flag. Bucket sizes left "auto" are filled from the model's hidden size as the Hugging
Face integration does. The resolved JSON is written to RUN/ds_config.json.
"""

from __future__ import annotations

import copy
import json
from importlib import resources

from distclm.errors import UserError

STAGES = {"ddp": None, "zero1": 1, "zero2": 2, "zero3": 3}


def zero_stage(strategy: str) -> int | None:
    """The ZeRO stage of a --train.strategy (None: plain DDP, no DeepSpeed)."""
    return STAGES[strategy]


def template_name(stage: int, offload: str) -> str:
    if offload == "all":
        return "zero3_offload_all.json"
    if offload == "optimizer":
        return "zero3_offload.json" if stage == 3 else "zero2_offload.json"
    return f"zero{stage}.json"


def load_template(name: str) -> dict:
    """A template shipped inside the package (an installed wheel has them too)."""
    return json.loads(resources.files("distclm").joinpath("ds_configs", name).read_text(encoding="utf-8"))


def check_offload(strategy: str, offload: str) -> None:
    stage = zero_stage(strategy)
    if offload != "none" and stage is None:
        raise UserError(f"--train.offload={offload} needs a ZeRO strategy (--train.strategy=zero2 or zero3)")
    if offload == "all" and stage != 3:
        raise UserError(f"--train.offload=all offloads parameters, which needs --train.strategy=zero3 "
                        f"(got {strategy}); use --train.offload=optimizer with {strategy}")


def batch_values(t, world: int, precision: str) -> dict:
    """What distclm decides, whatever a template or user JSON says. `precision`: 'no' | 'bf16' | 'fp16'."""
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # our torch AdamW
        "zero_force_ds_cpu_optimizer": False,   # the engine builds DeepSpeedCPUAdam itself when offloading
        "zero_optimization": {"stage": zero_stage(t.strategy)},
    }


def resolve(t, world: int, hidden_size: int, precision: str) -> dict:
    """The DeepSpeed config for `t` (the train section) on `world` processes, with no "auto" left."""
    check_offload(t.strategy, t.offload)
    ds = load_template(template_name(zero_stage(t.strategy), t.offload))
    if t.deepspeed_config:
        user = read_user_json(t.deepspeed_config)
        check_user(user, t, world)
        ds = merge(ds, user)
    ds = merge(ds, batch_values(t, world, precision))
    zo = ds["zero_optimization"]
    zo.setdefault("offload_optimizer", {"device": "none"})
    if t.offload == "none":
        zo["offload_optimizer"] = {"device": "none"}
        zo.pop("offload_param", None)
    # The Hugging Face integration's values for these buckets: they scale with the model's width. ZeRO-3 keeps
    # at most about two transformer layers (12 h^2 parameters each) gathered at once, instead of DeepSpeed's
    # default 1e9 parameters (4 GB in fp32: a whole 354 M model stayed gathered through each step on CPU).
    layer = 12 * hidden_size * hidden_size
    for key, value in {"reduce_bucket_size": hidden_size * hidden_size,
                       "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                       "stage3_param_persistence_threshold": 10 * hidden_size,
                       "stage3_max_live_parameters": 2 * layer, "stage3_max_reuse_distance": 2 * layer}.items():
        if zo.get(key) == "auto":
            zo[key] = value
    left = autos(ds)
    if left:
        raise UserError(f"DeepSpeed config still has \"auto\" for {', '.join(left)} after distclm filled its own "
                        f"values; set them in --train.deepspeed_config")
    return ds


def read_user_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            user = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"--train.deepspeed_config={path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"--train.deepspeed_config={path}: not valid JSON ({exc})") from None
    if not isinstance(user, dict):
        raise UserError(f"--train.deepspeed_config={path}: expected a JSON object")
    return user


def check_user(user: dict, t, world: int) -> None:
    """A user DeepSpeed JSON may add settings, not contradict distclm's batch/clipping/stage flags."""
    path = t.deepspeed_config
    expect = {
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "--train.micro_batch_size"),
        "gradient_accumulation_steps": (t.grad_accum, "--train.grad_accum"),
        "train_batch_size": (t.micro_batch_size * t.grad_accum * world,
                             f"--train.micro_batch_size x --train.grad_accum x world size {world}"),
        "gradient_clipping": (t.max_grad_norm, "--train.max_grad_norm"),
    }
    for key, (value, flag) in expect.items():
        got = user.get(key, "auto")
        if got != "auto" and got != value:
            raise UserError(f"--train.deepspeed_config={path}: {key}={got} contradicts {flag} = {value}; "
                            f"remove it from the JSON (or set it to \"auto\") or change the flag")
    stage = user.get("zero_optimization", {}).get("stage", "auto")
    if stage not in ("auto", zero_stage(t.strategy)):
        raise UserError(f"--train.deepspeed_config={path}: zero_optimization.stage={stage} contradicts "
                        f"--train.strategy={t.strategy}; the strategy flag decides the stage")


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, recursively for nested objects."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def autos(tree: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose value is still "auto"."""
    found = []
    for key, value in tree.items():
        if isinstance(value, dict):
            found += autos(value, f"{prefix}{key}.")
        elif value == "auto":
            found.append(prefix + key)
    return found
