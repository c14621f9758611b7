"""The config tree: one dataclass per section, every field with its default, its `--help` sentence, its
choices and, for a number, its bound (`bound=at_least(1)`, ...): the range is declared where the field is, and
parse.py checks every value against it where it is set, so a new number gets its range where it is defined."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Bound:
    """The values a numeric field accepts: finite always (no nan, no inf), `low`/`high` when given (each included
    unless `*_open`); `hint` is said after the range (what 0 means, what to use instead)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def allows(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def describe(self, integer: bool) -> str:
        """"an integer >= 1", "a finite number in (0, 1]", ... (+ the hint)."""
        kind, n = ("an integer" if integer else "a finite number"), _number
        if self.low is not None and self.high is not None:
            text = (f"{kind} in {'(' if self.low_open else '['}{n(self.low)}, {n(self.high)}"
                    f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {n(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {n(self.high)}"
        else:
            text = kind
        return text + (f" ({self.hint})" if self.hint else "")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def at_least(low: float, hint: str = "") -> Bound:
    return Bound(low=low, hint=hint)


def above(low: float, hint: str = "") -> Bound:
    return Bound(low=low, low_open=True, hint=hint)


def within(low: float, high: float, low_open: bool = False, high_open: bool = False, hint: str = "") -> Bound:
    return Bound(low, high, low_open, high_open, hint)


FINITE = Bound()  # any finite number
SEED = within(0, 2**32 - 1)  # numpy's seeds: 32-bit, not negative
POSITIVE = at_least(1)  # a count of at least one


def F(default: Any, doc: str, choices: tuple | None = None, auto: bool = False, bound: Bound | None = None) -> Any:
    """A config field: its default, the sentence `--help` shows, its allowed values, whether it takes `auto`, and
    (numbers: required, tests/e2e/test_trust_door.py) its bound."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "auto": auto, "bound": bound})


@dataclass
class DataConfig:
    source: Optional[str] = F(None, "Documents to prepare: a hub dataset id, a local file/folder/glob "
                                    "(.jsonl .json .parquet .txt, .gz too), or `pydoc` (embedded, offline).")
    config: Optional[str] = F(None, "Hub dataset configuration name.")
    split: str = F("train", "Split of the source to read.")
    revision: Optional[str] = F(None, "Hub dataset revision (branch, tag, commit, or refs/convert/parquet).")
    max_docs: Optional[int] = F(None, "Take only the first N documents (the tutorial's train[:5000]).", bound=POSITIVE)
    text_field: str = F("text", "Dotted path of the text in each record (e.g. answers.text); lists are joined.")
    join_with: str = F(" ", "Separator used to join a list of strings found at text_field.")
    txt_mode: str = F("file", "How .txt files split into documents.", ("file", "line", "paragraph"))
    eos_between_docs: bool = F(True, "Append the EOS token after each document (false = the tutorial's plain join).")
    block_size: int = F(128, "Tokens per training block.", bound=at_least(2, "a block predicts block_size - 1 tokens"))
    val_fraction: float = F(0.2, "Fraction of documents put in the validation split (per document, seeded).",
                            bound=within(0, 1, high_open=True))
    val_docs: Optional[int] = F(None, "Exact number of validation documents instead of a fraction.", bound=at_least(0))
    val_split: Optional[str] = F(None, "Use the dataset's own split (hub) or another local path as validation.")
    seed: int = F(0, "Seed of the train/validation split (nothing else).", bound=SEED)
    tokenizer: str = F("gpt2", "Tokenizer: `gpt2` (vendored, offline), a hub id, or a local folder.")
    num_workers: Optional[int] = F(None, "Tokenizer threads (default: all cores).", bound=POSITIVE)
    shard_blocks: int = F(65536, "Blocks per shard file.", bound=POSITIVE)
    dir: Optional[str] = F(None, "Folder of the prepared blocks (manifest.json + shards); for train/eval a comma "
                                 "list of folders is a weighted mixture (data.weights).")
    weights: Optional[str] = F(None, "Mixture weights, a comma list as long as data.dir (default: equal).")
    format: str = F("auto", "Record format: text, chat (a list of {role, content} at messages_field), "
                            "prompt_completion; auto = detected from the first record.",
                    ("auto", "text", "chat", "prompt_completion"))
    messages_field: str = F("messages", "Field of a chat record holding its list of {role, content} messages.")
    prompt_field: str = F("prompt", "Field of a prompt_completion record holding the prompt.")
    completion_field: str = F("completion", "Field of a prompt_completion record holding the completion.")
    chat_template: str = F("auto", "Chat template: auto (the tokenizer's own, else the ChatML-style default), "
                                   "default, or a Jinja file.")
    train_on: str = F("assistant", "Tokens that get loss in chat/prompt_completion data: the assistant turns / "
                                   "completion (with what closes them), or all.", ("assistant", "all"))
    overlong: str = F("truncate", "A sample longer than the block: truncate (its head kept) or drop; counted.",
                      ("truncate", "drop"))
    allow_template_mismatch: bool = F(False, "Train although the data's chat template differs from the model "
                                             "tokenizer's own.")
    allow_tokenizer_mismatch: bool = F(False, "Train or evaluate although the data was tokenized with another "
                                              "tokenizer than the model's (compared by content: vocabulary and "
                                              "merges); the run then carries the data's tokenizer.")


@dataclass
class ModelConfig:
    name: Optional[str] = F(None, "Model: a hub id, a Hugging Face folder, a run dir, or a preset built from "
                                  "config with random init (gpt2-tiny, distilgpt2-arch, llama-tiny, qwen2-tiny, "
                                  "neox-tiny).")
    trust_remote_code: bool = F(False, "Allow a hub model to run its own code (off unless you trust it).")


@dataclass
class LoraConfig:
    r: int = F(0, "LoRA rank through peft (0 = off: the whole model trains); the base model is frozen.", bound=at_least(0, "0 = off"))
    alpha: float = F(16.0, "LoRA alpha: the adapter's output is scaled by alpha / r.", bound=above(0))
    dropout: float = F(0.0, "Dropout on the adapter's input.", bound=within(0, 1, high_open=True))
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
                                 "grad_accum x world).", auto=True, bound=POSITIVE)
    grad_accum: int = F(1, "Micro-batches accumulated per optimizer step (derived when global_batch_size is set).", bound=POSITIVE)
    global_batch_size: Optional[int] = F(None, "Blocks per optimizer step on any world size: grad_accum = global / "
                                               "(micro_batch_size x world size); a resume may change the world size.", bound=POSITIVE)
    fused_loss: bool = F(True, "Compute the loss from the last hidden states in chunks, never materialising the "
                               "(tokens x vocab) logits (training and eval); false = the model's own loss.")
    doc_attention: str = F("cross", "Attention across the EOS between packed documents (cross, as the tutorial) "
                                    "or only within each document of a block (within).", ("cross", "within"))
    lr: float = F(2e-5, "Peak learning rate (AdamW).", bound=above(0))
    weight_decay: float = F(0.01, "AdamW weight decay (not applied to biases and LayerNorm).", bound=at_least(0))
    schedule: str = F("linear", "Learning-rate decay after warmup.", ("linear", "cosine", "constant"))
    warmup_steps: int = F(0, "Linear warmup steps.", bound=at_least(0))
    max_grad_norm: float = F(1.0, "Gradient clipping norm (0 = off).", bound=at_least(0, "0 = off"))
    epochs: int = F(3, "Passes over the train split.", bound=POSITIVE)
    max_steps: Optional[int] = F(None, "Optimizer steps to run (wins over epochs).", bound=POSITIVE)
    seed: int = F(0, "Seed of everything in training: init, data order, dropout.", bound=SEED)
    activation_checkpointing: bool = F(False, "Recompute activations in backward to save memory.")
    compile: bool = F(False, "torch.compile the model.")
    save_every: int = F(0, "Checkpoint every N steps (0 = only at the end).", bound=at_least(0, "0 = only at the end"))
    keep_last: int = F(2, "Complete checkpoints kept.", bound=POSITIVE)
    preempt_grace_s: float = F(30.0, "Seconds allowed to save a checkpoint after SIGTERM.", bound=at_least(0))
    on_nonfinite: str = F("stop", "On a non-finite loss or gradient.", ("stop", "skip"))
    max_nonfinite: int = F(3, "Consecutive non-finite steps skipped before stopping.", bound=POSITIVE)
    dist_timeout_s: float = F(600.0, "Seconds to wait for the other ranks (joining the rendezvous, forming the "
                                    "process group, each collective) before failing with a message naming "
                                    "MASTER_ADDR:MASTER_PORT; raise it when nodes start far apart or saves are slow.", bound=above(0))
    z3_leaf_modules: str = F("auto", "ZeRO-3: modules gathered whole at their forward. auto = mixture-of-experts "
                                     "blocks whose experts are separate modules (found from the structure; else a "
                                     "rank that routes no token to an expert hangs the others); none; or a comma "
                                     "list of class names, with auto among them to keep the rule's.")
    hang_timeout_s: float = F(120.0, "Seconds a rank may wait in a collective for ranks that do not arrive before "
                                     "the live ranks name them (host, phase, step), dump their stacks to "
                                     "RUN/hang-rank{R}.txt and exit 75 (0 = off; docs/hangs.md).", bound=at_least(0, "0 = off"))
    push_to_hub: bool = F(False, "After training and its export, push RUN/export to --hub.repo_id (rank 0, after the "
                                 "process group is closed); a failed push warns and keeps exit 0 (docs/hub.md).")


@dataclass
class EvalConfig:
    split: str = F("validation", "Split of the prepared data to evaluate.")
    batch_size: int = F(8, "Blocks per process per eval forward.", bound=POSITIVE)
    every_steps: int = F(0, "Evaluate every N steps during training (0 = at each epoch end only).",
                         bound=at_least(0, "0 = at each epoch end only"))
    output: Optional[str] = F(None, "Write the eval result as JSON to this file.")
    max_blocks: Optional[int] = F(None, "Evaluate only the first N blocks of the split (the same blocks on any "
                                        "world size); none = all of them.", bound=POSITIVE)
    at_end: bool = F(True, "Evaluate after the last training step (also when it is not an epoch end).")


@dataclass
class GenConfig:
    prompt: Optional[str] = F(None, "Prompt to continue.")
    max_new_tokens: int = F(100, "Tokens generated per prompt.", bound=POSITIVE)
    do_sample: bool = F(True, "Sample (false = greedy).")
    top_k: int = F(50, "Top-k sampling.", bound=at_least(0, "0 = off"))
    top_p: float = F(0.95, "Nucleus sampling.", bound=within(0, 1, low_open=True))
    temperature: float = F(1.0, "Sampling temperature.", bound=above(0, "use --gen.do_sample=false for greedy"))
    num_return_sequences: int = F(1, "Samples per prompt.", bound=POSITIVE)
    seed: int = F(0, "Seed set with transformers.set_seed before generating.", bound=SEED)
    chat: bool = F(False, "Render the prompt as a user turn with the chat template (the model's, else the data's) "
                          "plus the generation prompt; stop at the end of turn; print only the answer.")


@dataclass
class LogConfig:
    every_steps: int = F(10, "metrics.jsonl record every N steps (first and last always).",
                         bound=at_least(0, "0 = the first and last step only"))
    interval_s: float = F(10.0, "Seconds between plain console lines when there is no terminal.", bound=at_least(0))
    peak_tflops: Optional[float] = F(None, "Device peak TFLOP/s for MFU (default: from a table of known GPUs).", bound=above(0))
    block_ids: bool = F(False, "Append the block ids each rank trains on to RUN/block_ids-rank{R}.txt.")
    trackers: str = F("none", "Experiment trackers (rank 0, the metrics.jsonl records): none or a comma list of "
                              "tensorboard, mlflow, wandb (pip install 'distclm[trackers]').")


@dataclass
class RunConfig:
    dir: Optional[str] = F(None, "Run directory (default runs/<model>-<YYYYmmdd-HHMMSS>).")
    resume: str = F("auto", "auto (newest complete checkpoint, else fresh) | none | PATH.")
    overwrite: bool = F(False, "Allow a run/data dir that holds another configuration to be replaced.")
    nproc: Optional[int] = F(None, "Processes `distclm run` starts for training (default: one per GPU, "
                                   "else 2 on CPU when there are 2+ cores).", bound=POSITIVE)


@dataclass
class PlanConfig:
    world: int = F(1, "Ranks to plan for (distclm plan; any number, not only what this machine has).", bound=POSITIVE)
    device_memory: Optional[str] = F(None, "Memory per rank, e.g. 80GB or 141GiB (default: this machine's GPU, "
                                           "else its RAM shared by min(world, cores) CPU ranks).")
    device_tflops: Optional[float] = F(None, "Sustained TFLOP/s per rank (default: 40% of a known GPU's peak; "
                                             "CPU: a measured matmul; a device named by memory only: 400).", bound=above(0))
    bandwidth_gbps: Optional[float] = F(None, "Collective bandwidth per rank in Gbit/s (default: 400 on GPUs, "
                                              "40 for CPU ranks on one host).", bound=above(0))
    baseline: Optional[str] = F(None, "Memory of a rank before any model, e.g. 1GB (default: measured once here "
                                      "for CPU ranks, cached in ~/.cache/distclm; 1 GiB of CUDA context on GPUs).")
    margin: float = F(0.1, "Share of the device's memory kept free: a configuration fits under (1 - margin).",
                      bound=within(0, 1, high_open=True))
    output: Optional[str] = F(None, "Write the plan as JSON to this file.")


@dataclass
class HubConfig:
    repo_id: Optional[str] = F(None, "Hugging Face Hub repo to push the export to, USER/NAME or ORG/NAME (`distclm "
                                     "export RUN --hub.repo_id=...`, or --train.push_to_hub=true); token: HF_TOKEN "
                                     "or `hf auth login`.")
    private: bool = F(False, "Create the repo private (an existing repo keeps its visibility).")
    revision: Optional[str] = F(None, "Branch to push to, created from main when missing (none: main).")
    commit_message: Optional[str] = F(None, "Commit message of the push (none: 'distclm export at step N').")
    adapter_only: bool = F(False, "A LoRA run: push export/adapter/ (the adapter and its card) alone instead of the "
                                  "merged model.")
    license: Optional[str] = F(None, "License id for the model card (e.g. apache-2.0); none: the base model's, "
                                     "when its card is on this machine.")


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
    hub: HubConfig = field(default_factory=HubConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = [f.name for f in dataclasses.fields(Config)]


@functools.cache
def field_specs() -> dict[str, tuple[dataclasses.Field, Any]]:
    """Every config field by its dotted name -> (dataclass field, resolved type); computed once (read-only)."""
    specs = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            specs[f"{section.name}.{f.name}"] = (f, hints[f.name])
    return specs


def num_workers(cfg: DataConfig) -> int:
    return cfg.num_workers or os.cpu_count() or 1
