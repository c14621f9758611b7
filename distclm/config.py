"""One typed config tree for every distclm command.

Precedence, lowest first: field defaults < `--preset=NAME` < `--config FILE.yaml` < `--section.key=value`.
Every field carries its documentation (it becomes `--help`) and, where it has one, its set of choices.
Values are checked when they are set, so an error names the flag (or file) it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from distclm.errors import UserError
from distclm.presets import PRESETS


def F(default: Any, doc: str, choices: tuple | None = None, auto: bool = False) -> Any:
    """A config field: its default, the sentence `--help` shows, its allowed values, whether it takes `auto`."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "auto": auto})


@dataclass
class DataConfig:
    source: Optional[str] = F(None, "Documents to prepare: a hub dataset id, a local file/folder/glob "
                                    "(.jsonl .json .parquet .txt, .gz too), or `pydoc` (embedded, offline).")
    config: Optional[str] = F(None, "Hub dataset configuration name.")
    split: str = F("train", "Split of the source to read.")
    revision: Optional[str] = F(None, "Hub dataset revision (branch, tag, commit, or refs/convert/parquet).")
    max_docs: Optional[int] = F(None, "Take only the first N documents (the tutorial's train[:5000]).")
    text_field: str = F("text", "Dotted path of the text in each record (e.g. answers.text); lists are joined.")
    join_with: str = F(" ", "Separator used to join a list of strings found at text_field.")
    txt_mode: str = F("file", "How .txt files split into documents.", ("file", "line", "paragraph"))
    eos_between_docs: bool = F(True, "Append the EOS token after each document (false = the tutorial's plain join).")
    block_size: int = F(128, "Tokens per training block.")
    val_fraction: float = F(0.2, "Fraction of documents put in the validation split (per document, seeded).")
    val_docs: Optional[int] = F(None, "Exact number of validation documents instead of a fraction.")
    val_split: Optional[str] = F(None, "Use the dataset's own split (hub) or another local path as validation.")
    seed: int = F(0, "Seed of the train/validation split (nothing else).")
    tokenizer: str = F("gpt2", "Tokenizer: `gpt2` (vendored, offline), a hub id, or a local folder.")
    num_workers: Optional[int] = F(None, "Tokenizer threads (default: all cores).")
    shard_blocks: int = F(65536, "Blocks per shard file.")
    dir: Optional[str] = F(None, "Folder of the prepared blocks (manifest.json + shards); for train/eval a comma "
                                 "list of folders is a weighted mixture (data.weights).")
    weights: Optional[str] = F(None, "Mixture weights, a comma list as long as data.dir (default: equal).")


@dataclass
class ModelConfig:
    name: Optional[str] = F(None, "Model: a hub id, a Hugging Face folder, a run dir, or a preset built from "
                                  "config with random init (gpt2-tiny, distilgpt2-arch, llama-tiny, qwen2-tiny, "
                                  "neox-tiny).")
    trust_remote_code: bool = F(False, "Allow a hub model to run its own code (off unless you trust it).")


@dataclass
class LoraConfig:
    r: int = F(0, "LoRA rank through peft (0 = off: the whole model trains); the base model is frozen.")
    alpha: float = F(16.0, "LoRA alpha: the adapter's output is scaled by alpha / r.")
    dropout: float = F(0.0, "Dropout on the adapter's input.")
    target_modules: str = F("auto", "Modules to adapt: auto (peft's default for the architecture) or a comma list "
                                    "of module names (e.g. q_proj,v_proj).")


@dataclass
class TrainConfig:
    strategy: str = F("ddp", "Data parallelism: ddp or DeepSpeed ZeRO stage 1/2/3.", ("ddp", "zero1", "zero2", "zero3"))
    offload: str = F("none", "ZeRO CPU offload.", ("none", "optimizer", "all"))
    deepspeed_config: Optional[str] = F(None, "A DeepSpeed JSON merged under distclm's values, then checked.")
    backend: str = F("auto", "torch.distributed backend (auto: nccl on GPU, gloo on CPU).", ("auto", "nccl", "gloo"))
    precision: str = F("auto", "auto = bf16 on GPUs that have it, else fp32.", ("auto", "fp32", "bf16", "fp16"))
    micro_batch_size: int = F(8, "Blocks per process per forward pass; auto = the largest `distclm plan` says fits "
                                 "this device (global batch kept exact: --train.global_batch_size, else 8 x "
                                 "grad_accum x world).", auto=True)
    grad_accum: int = F(1, "Micro-batches accumulated per optimizer step (derived when global_batch_size is set).")
    global_batch_size: Optional[int] = F(None, "Blocks per optimizer step on any world size: grad_accum = global / "
                                               "(micro_batch_size x world size); a resume may change the world size.")
    fused_loss: bool = F(True, "Compute the loss from the last hidden states in chunks, never materialising the "
                               "(tokens x vocab) logits (training and eval); false = the model's own loss.")
    doc_attention: str = F("cross", "Attention across the EOS between packed documents (cross, as the tutorial) "
                                    "or only within each document of a block (within).", ("cross", "within"))
    lr: float = F(2e-5, "Peak learning rate (AdamW).")
    weight_decay: float = F(0.01, "AdamW weight decay (not applied to biases and LayerNorm).")
    schedule: str = F("linear", "Learning-rate decay after warmup.", ("linear", "cosine", "constant"))
    warmup_steps: int = F(0, "Linear warmup steps.")
    max_grad_norm: float = F(1.0, "Gradient clipping norm (0 = off).")
    epochs: int = F(3, "Passes over the train split.")
    max_steps: Optional[int] = F(None, "Optimizer steps to run (wins over epochs).")
    seed: int = F(0, "Seed of everything in training: init, data order, dropout.")
    activation_checkpointing: bool = F(False, "Recompute activations in backward to save memory.")
    compile: bool = F(False, "torch.compile the model.")
    save_every: int = F(0, "Checkpoint every N steps (0 = only at the end).")
    keep_last: int = F(2, "Complete checkpoints kept.")
    preempt_grace_s: float = F(30.0, "Seconds allowed to save a checkpoint after SIGTERM.")
    on_nonfinite: str = F("stop", "On a non-finite loss or gradient.", ("stop", "skip"))
    max_nonfinite: int = F(3, "Consecutive non-finite steps skipped before stopping.")
    dist_timeout_s: float = F(600.0, "Seconds to wait for the other ranks (joining the rendezvous, forming the "
                                    "process group, each collective) before failing with a message naming "
                                    "MASTER_ADDR:MASTER_PORT; raise it when nodes start far apart or saves are slow.")


@dataclass
class EvalConfig:
    split: str = F("validation", "Split of the prepared data to evaluate.")
    batch_size: int = F(8, "Blocks per process per eval forward.")
    every_steps: int = F(0, "Evaluate every N steps during training (0 = at each epoch end only).")
    output: Optional[str] = F(None, "Write the eval result as JSON to this file.")
    max_blocks: Optional[int] = F(None, "Evaluate only the first N blocks of the split (the same blocks on any "
                                        "world size); none = all of them.")
    at_end: bool = F(True, "Evaluate after the last training step (also when it is not an epoch end).")


@dataclass
class GenConfig:
    prompt: Optional[str] = F(None, "Prompt to continue.")
    max_new_tokens: int = F(100, "Tokens generated per prompt.")
    do_sample: bool = F(True, "Sample (false = greedy).")
    top_k: int = F(50, "Top-k sampling.")
    top_p: float = F(0.95, "Nucleus sampling.")
    temperature: float = F(1.0, "Sampling temperature.")
    num_return_sequences: int = F(1, "Samples per prompt.")
    seed: int = F(0, "Seed set with transformers.set_seed before generating.")


@dataclass
class LogConfig:
    every_steps: int = F(10, "metrics.jsonl record every N steps (first and last always).")
    interval_s: float = F(10.0, "Seconds between plain console lines when there is no terminal.")
    peak_tflops: Optional[float] = F(None, "Device peak TFLOP/s for MFU (default: from a table of known GPUs).")
    block_ids: bool = F(False, "Append the block ids each rank trains on to RUN/block_ids-rank{R}.txt.")
    trackers: str = F("none", "Experiment trackers (rank 0, the metrics.jsonl records): none or a comma list of "
                              "tensorboard, mlflow, wandb (pip install 'distclm[trackers]').")


@dataclass
class RunConfig:
    dir: Optional[str] = F(None, "Run directory (default runs/<model>-<YYYYmmdd-HHMMSS>).")
    resume: str = F("auto", "auto (newest complete checkpoint, else fresh) | none | PATH.")
    overwrite: bool = F(False, "Allow a run/data dir that holds another configuration to be replaced.")
    nproc: Optional[int] = F(None, "Processes `distclm run` starts for training (default: one per GPU, "
                                   "else 2 on CPU when there are 2+ cores).")


@dataclass
class PlanConfig:
    world: int = F(1, "Ranks to plan for (distclm plan; any number, not only what this machine has).")
    device_memory: Optional[str] = F(None, "Memory per rank, e.g. 80GB or 141GiB (default: this machine's GPU, "
                                           "else its RAM shared by min(world, cores) CPU ranks).")
    device_tflops: Optional[float] = F(None, "Sustained TFLOP/s per rank (default: 40% of a known GPU's peak; "
                                             "CPU: a measured matmul; a device named by memory only: 400).")
    bandwidth_gbps: Optional[float] = F(None, "Collective bandwidth per rank in Gbit/s (default: 400 on GPUs, "
                                              "40 for CPU ranks on one host).")
    baseline: Optional[str] = F(None, "Memory of a rank before any model, e.g. 1GB (default: measured once here "
                                      "for CPU ranks, cached in ~/.cache/distclm; 1 GiB of CUDA context on GPUs).")
    margin: float = F(0.1, "Share of the device's memory kept free: a configuration fits under (1 - margin).")
    output: Optional[str] = F(None, "Write the plan as JSON to this file.")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = [f.name for f in dataclasses.fields(Config)]


def field_specs() -> dict[str, tuple[dataclasses.Field, Any]]:
    """Every config field by its dotted name -> (dataclass field, resolved type)."""
    specs = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            specs[f"{section.name}.{f.name}"] = (f, hints[f.name])
    return specs


def _base_type(tp: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of `str`, `Optional[int]`, ..."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(key: str, value: Any, origin: str) -> Any:
    """Turn a string (flag) or YAML value into the field's type; errors name the key and origin."""
    specs = field_specs()
    f, tp = specs[key]
    base, optional = _base_type(tp)
    where = f"--{key}" if origin == "flag" else f"'{key}' in {origin}"
    if f.metadata.get("auto") and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"

    def bad(expected: str) -> UserError:
        return UserError(f"{where}: expected {expected}, got {value!r}")

    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and base is not str):
        if optional:
            return None
        raise bad(base.__name__)
    if isinstance(value, str) and optional and base is str and value.lower() in ("none", "null"):
        return None
    if base is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            out = value.lower() in _TRUE
        else:
            raise bad("true or false")
    elif base is int:
        if isinstance(value, bool):
            raise bad("an integer")
        try:
            out = int(value) if not isinstance(value, float) or value.is_integer() else None
        except (TypeError, ValueError):
            out = None
        if out is None:
            raise bad("an integer")
    elif base is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    else:
        if isinstance(value, (dict, list)):
            raise bad("a string")
        out = str(value)
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise UserError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    return out


def closest_key(key: str) -> str:
    """A hint naming the valid key nearest to a misspelt one."""
    keys = list(field_specs())
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not match:  # a bare field name without its section: look for it in every section
        match = [k for k in keys if k.split(".", 1)[1] == key.split(".")[-1]][:1]
    return f" (did you mean --{match[0]}?)" if match else " (see --help for the valid keys)"


def apply(cfg: Config, updates: dict[str, Any], origin: str) -> None:
    """Set dotted keys on `cfg`, checking each key and value."""
    specs = field_specs()
    for key, value in updates.items():
        if key not in specs:
            where = "unknown flag --" if origin == "flag" else f"unknown key in {origin}: "
            raise UserError(f"{where}{key}{closest_key(key)}")
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, coerce(key, value, origin))


def flatten(tree: dict, origin: str) -> dict[str, Any]:
    """{section: {key: value}} -> {"section.key": value}, rejecting a malformed tree."""
    out = {}
    if not isinstance(tree, dict):
        raise UserError(f"{origin}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, body in tree.items():
        if section not in SECTIONS:
            hint = difflib.get_close_matches(str(section), SECTIONS, n=1)
            raise UserError(f"unknown section in {origin}: {section!r}"
                            + (f" (did you mean {hint[0]!r}?)" if hint else f" (sections: {', '.join(SECTIONS)})"))
        if not isinstance(body, dict):
            raise UserError(f"{origin}: section {section!r} must be a mapping of keys to values")
        for key, value in body.items():
            out[f"{section}.{key}"] = value
    return out


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            tree = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return flatten(tree, path)


def build_config(preset: str | None = None, file: str | None = None,
                 flags: dict[str, Any] | None = None) -> Config:
    """Defaults < preset < YAML file < flags, then cross-field checks."""
    cfg = Config()
    if preset is not None:
        if preset not in PRESETS:
            hint = difflib.get_close_matches(preset, list(PRESETS), n=1)
            raise UserError(f"unknown --preset={preset}" + (f" (did you mean {hint[0]}?)" if hint else "")
                            + f"; presets: {', '.join(PRESETS)}")
        apply(cfg, flatten(PRESETS[preset], f"preset {preset}"), f"preset {preset}")
    if file is not None:
        apply(cfg, load_yaml(file), file)
    if flags:
        apply(cfg, flags, "flag")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that span one field's type: ranges and combinations. Errors name the flag."""
    d, t = cfg.data, cfg.train
    positive = {
        "data.block_size": d.block_size, "data.shard_blocks": d.shard_blocks,
        "train.micro_batch_size": 1 if t.micro_batch_size == "auto" else t.micro_batch_size, "train.grad_accum": t.grad_accum,
        "eval.batch_size": cfg.eval.batch_size, "gen.max_new_tokens": cfg.gen.max_new_tokens,
        "gen.num_return_sequences": cfg.gen.num_return_sequences, "train.keep_last": t.keep_last,
        "train.max_nonfinite": t.max_nonfinite,
    }
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"--{key} must be at least 1, got {value}")
    if d.block_size < 2:
        raise UserError(f"--data.block_size must be at least 2 (a block predicts block_size-1 tokens), got {d.block_size}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise UserError(f"--data.val_fraction must be in [0, 1), got {d.val_fraction}")
    for key, value in {"data.max_docs": d.max_docs, "data.val_docs": d.val_docs,
                       "data.num_workers": d.num_workers, "train.max_steps": t.max_steps,
                       "train.global_batch_size": t.global_batch_size,
                       "eval.max_blocks": cfg.eval.max_blocks}.items():
        if value is not None and value < (0 if key == "data.val_docs" else 1):
            raise UserError(f"--{key} must be positive, got {value}")
    for key, value in {"train.epochs": t.epochs, "train.warmup_steps": t.warmup_steps,
                       "train.save_every": t.save_every, "eval.every_steps": cfg.eval.every_steps,
                       "log.every_steps": cfg.log.every_steps}.items():
        if value < 0:
            raise UserError(f"--{key} must be >= 0, got {value}")
    if t.dist_timeout_s <= 0:
        raise UserError(f"--train.dist_timeout_s must be positive, got {t.dist_timeout_s}")
    if t.lr <= 0:
        raise UserError(f"--train.lr must be positive, got {t.lr}")
    lora = cfg.lora
    if lora.r < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
        raise UserError(f"--lora.r must be >= 0, --lora.alpha > 0 and --lora.dropout in [0, 1); got r={lora.r}, "
                        f"alpha={lora.alpha}, dropout={lora.dropout}")
    if not 0 < cfg.gen.top_p <= 1:
        raise UserError(f"--gen.top_p must be in (0, 1], got {cfg.gen.top_p}")


def num_workers(cfg: DataConfig) -> int:
    return cfg.num_workers or os.cpu_count() or 1


def to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)


def _shown(default: Any) -> str:
    """A default as --help shows it: none, true/false, a quoted string when it has outer spaces."""
    if default is None:
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, str) and default.strip() != default:
        return repr(default)
    return str(default)


def help_lines() -> list[tuple[str, str]]:
    """(`--section.key`, "doc (default: X; one of a, b)") for every field, in tree order."""
    rows = []
    for key, (f, _tp) in field_specs().items():
        choices = f.metadata.get("choices")
        default = _shown(f.default)
        extra = f"default: {default}" + (f"; one of {'|'.join(choices)}" if choices else "")
        rows.append((f"--{key}", f"{f.metadata['doc']} ({extra})"))
    return rows
