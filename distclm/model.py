"""Causal LMs and their tokenizers: a hub id, a local Hugging Face folder, a run dir, or a named preset.

Any `AutoModelForCausalLM` architecture whose configuration has the standard fields works: sizes are
read through `ModelShape` (hidden_size, num_hidden_layers, num_attention_heads,
max_position_embeddings, vocab_size, of the text config for composite models), never through one
architecture's attribute names. No distributed code here (torchtitan's rule): under ZeRO-3 the
engine registers DeepSpeed's config before `build_model` runs, and transformers then constructs and
loads the model partitioned (`zero.Init`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from distclm.data.identity import IDENTITY
from distclm.data.tokenize import GPT2_REFERENCE
from distclm.errors import UserError, first_line
from distclm.hub import is_local

# Named architectures built from config with random init: offline, for tests, the demo and benchmarks.
# GPT-2 vocabulary (the vendored tokenizer), no dropout: runs on 1 and N processes compute the same numbers.
_GPT2_VOCAB = dict(vocab_size=GPT2_REFERENCE["vocab_size"], bos_token_id=GPT2_REFERENCE["eos_token_id"],
                   eos_token_id=GPT2_REFERENCE["eos_token_id"])
_TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024)
_MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02)
ARCH_PRESETS: dict[str, tuple[str, dict]] = {
    # 2 layers, 128 wide: ~6.96 M parameters, 6.43 M of them the (tied) embedding.
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_embd=128, n_head=4, n_positions=1024,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    # DistilGPT2's exact shape: 6 layers, 768 wide, 12 heads, 1024 positions (~81.9 M parameters).
    "distilgpt2-arch": ("gpt2", dict(n_layer=6, n_embd=768, n_head=12, n_positions=1024,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    # RMSNorm, RoPE, SwiGLU, grouped-query attention (2 KV heads), untied output embedding.
    "llama-tiny": ("llama", dict(_TINY, intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=False)),
    # Llama-like with biases on q/k/v, tied embedding.
    "qwen2-tiny": ("qwen2", dict(_TINY, intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=True)),
    # Parallel residual, partial rotary (25% of each head), untied output embedding.
    "neox-tiny": ("gpt_neox", dict(_TINY, intermediate_size=512, rotary_pct=0.25, hidden_dropout=0.0,
                                   attention_dropout=0.0, tie_word_embeddings=False)),
    # Mixture of experts (docs/moe.md): each layer's MLP is 4 SwiGLU experts, 2 per token, chosen by a router;
    # the router's load-balancing loss (x 0.02) is part of the training objective (output_router_logits).
    "mixtral-tiny": ("mixtral", dict(_TINY, intermediate_size=256, num_key_value_heads=2, num_local_experts=4,
                                     **_MOE, tie_word_embeddings=False)),
    # Qwen2-MoE: 4 routed experts (2 per token) plus an always-on shared expert behind a sigmoid gate.
    "qwen2moe-tiny": ("qwen2_moe", dict(_TINY, intermediate_size=256, moe_intermediate_size=128,
                                        shared_expert_intermediate_size=256, num_key_value_heads=2, num_experts=4,
                                        decoder_sparse_step=1, **_MOE, tie_word_embeddings=False)),
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes distclm needs, in the standard configuration names."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    max_positions: int | None  # None: no position limit (the architecture has none)
    vocab_size: int

    @classmethod
    def of(cls, config) -> "ModelShape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                   if getattr(text, k, None) is None]
        if missing:
            raise UserError(f"model type {text.model_type!r}: its configuration lacks {', '.join(missing)}, which "
                            f"distclm reads to size the run; only causal LMs with the standard fields are supported")
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
        positions = getattr(text, "max_position_embeddings", None)
        return cls(text.model_type, int(text.hidden_size), int(text.num_hidden_layers), heads, int(head_dim),
                   int(positions) if positions else None, int(text.vocab_size))


def resolve_model_dir(name: str) -> str:
    """A run dir means its export (if present) or its newest complete checkpoint that holds full weights."""
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.yaml").exists() and not (path / "config.json").exists():
        if (path / "export" / "config.json").exists():
            return str(path / "export")
        ckpts = sorted((p for p in (path / "checkpoints").glob("step-*") if (p / "COMPLETE").exists()),
                       key=lambda p: int(p.name.split("-")[1]))
        for ckpt in reversed(ckpts):
            if any((ckpt / "model").glob("*.safetensors")):
                return str(ckpt / "model")
        raise UserError(f"--model.name={name}: a run dir with no export/ and no checkpoint holding full weights "
                        f"(ZeRO-3 checkpoints hold shards only); run `distclm export {name}` first")
    return name


def quiet_loading() -> None:
    """No "Loading weights" progress bar on stderr: a command's output is its result (and its one error line)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def preset_config(name: str):
    from transformers import AutoConfig

    model_type, kwargs = ARCH_PRESETS[name]
    return AutoConfig.for_model(model_type, **_GPT2_VOCAB, **kwargs)


def load_config(name: str, trust_remote_code: bool = False):
    """The model's configuration only (no weights): enough to size and check a run before any set-up."""
    from transformers import AutoConfig

    if name in ARCH_PRESETS:
        return preset_config(name)
    source = _source(name)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - hub and file errors come in many types
        raise _load_error(name, exc) from None


def _source(name: str) -> str:
    """A local folder (checked) or a hub id (offline mode switched on at once when the hub is unreachable)."""
    name = resolve_model_dir(name)
    if is_local(name):
        folder = Path(name).expanduser()
        if not (folder / "config.json").exists():
            raise UserError(f"--model.name={name}: not a Hugging Face model folder (no config.json), a run dir, "
                            f"or a preset ({', '.join(ARCH_PRESETS)})")
        return str(folder)
    from distclm.hub import ensure_offline_if_unreachable

    ensure_offline_if_unreachable()
    return name


def _load_error(name: str, exc: Exception) -> UserError:
    first, text = first_line(exc), str(exc)
    if "custom code" in text or "trust_remote_code" in text:  # transformers' refusal (a folder's or a hub repo's)
        return UserError(f"--model.name={name}: the model comes with its own code (auto_map in its config.json), "
                         f"which distclm does not run by default; pass --model.trust_remote_code=true only if you "
                         f"trust that code")
    if "Weights only load failed" in text:  # a pickle that would run code (safe_load.py): name the file
        from distclm.safe_load import find_unsafe, refusal

        hit = find_unsafe(Path(resolve_model_dir(name)).expanduser()) if is_local(name) else None
        if hit is not None:
            return UserError(refusal(*hit, "save the model as safetensors (save_pretrained's default) or use "
                                           "another --model.name"))
        return UserError(f"--model.name={name}: its weights hold more than tensors, which loading would run as "
                         f"code; use a model saved as safetensors (or with torch.save of tensors only)")
    if is_local(name):
        return UserError(f"--model.name={name}: cannot load the model from this folder ({first})")
    from distclm.hub import hub_reachable, offline_hint

    why = offline_hint("model", "--model.name") if not hub_reachable() else first
    return UserError(f"--model.name={name}: cannot load it from the Hugging Face Hub: {why}; "
                     f"or use a preset: --model.name=gpt2-tiny")


def build_model(name: str, seed: int, trust_remote_code: bool = False, dtype=None):
    """The model (fp32 unless `dtype`): pretrained weights, or a preset's seeded random init.

    A preset is initialised the same way whether or not ZeRO-3 partitions it during construction:
    torch's own init is skipped and transformers' `initialize_weights` runs once, in module order,
    from `seed` (under ZeRO-3 transformers does exactly this, one gathered module at a time).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    if name in ARCH_PRESETS:
        from contextlib import nullcontext

        from transformers.initialization import no_init_weights

        zero3 = is_deepspeed_zero3_enabled()  # transformers then skips torch's init and initialises itself
        torch.manual_seed(seed)
        with nullcontext() if zero3 else no_init_weights():
            model = AutoModelForCausalLM.from_config(preset_config(name), attn_implementation="sdpa",
                                                     dtype=dtype or torch.float32)
        if not zero3:
            torch.manual_seed(seed)
            model.initialize_weights()
            model.tie_weights()
        return _named_loss(model)
    source = _source(name)
    kwargs = dict(trust_remote_code=trust_remote_code, dtype=dtype or torch.float32)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **kwargs)
        except ValueError as exc:  # an architecture without SDPA support: its default attention
            if not any(w in str(exc).lower() for w in ("sdpa", "scaled_dot_product_attention")):
                raise
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub and file errors come in many types
        raise _load_error(name, exc) from None
    return _named_loss(model)


def _named_loss(model):
    """Name the loss transformers would fall back to anyway, so it does not warn about it on every rank."""
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def load_model_tokenizer(name: str, data_tokenizer: str = "gpt2", carried: str | None = None):
    """The tokenizer that goes with the model: `carried` when given (the data's, see `carried_tokenizer`), else its
    own (folder/hub), else the data's (presets)."""
    from distclm.data.tokenize import load_hf_tokenizer

    if carried is not None:
        return load_hf_tokenizer(carried)[0]
    if name in ARCH_PRESETS:
        return load_hf_tokenizer(data_tokenizer)[0]
    try:
        return load_hf_tokenizer(resolve_model_dir(name))[0]
    except UserError:
        return load_hf_tokenizer(data_tokenizer)[0]


def check_data_fits(shape: ModelShape, reader, flag: str) -> None:
    """The prepared data must fit the model, said in the model's own terms: ids < vocab, block <= positions."""
    where = reader.folder / "manifest.json"
    if reader.vocab_size > shape.vocab_size:
        raise UserError(f"{flag}: its vocabulary has {shape.vocab_size:,} tokens (vocab_size of its {shape.model_type} "
                        f"config) but {where} was tokenized with {reader.manifest.get('tokenizer', {}).get('name')} "
                        f"({reader.vocab_size:,} tokens); prepare the data with the model's tokenizer (--data.tokenizer)")
    if shape.max_positions is not None and reader.block_size > shape.max_positions:
        raise UserError(f"{flag}: it handles at most {shape.max_positions} positions (max_position_embeddings of its "
                        f"{shape.model_type} config) but {where} has blocks of {reader.block_size} tokens; prepare "
                        f"with --data.block_size<={shape.max_positions}")


@lru_cache(maxsize=8)
def model_tokenizer_identity(name: str) -> tuple[str, str | None]:
    """(what the model's tokenizer is, its identity by content: tokenize.vocabulary_sha256). The presets' is the
    vendored GPT-2; a folder's (a run's export or checkpoint too) is read from its files; a hub model's is loaded.
    None: the model comes with no tokenizer that can be read, so there is nothing to compare."""
    from distclm.data.identity import TOKENIZER_FILES, folder_identity, hf_identity
    from distclm.data.tokenize import VENDORED_GPT2, load_hf_tokenizer

    if name in ARCH_PRESETS:
        return "gpt2, vendored: the presets' tokenizer", folder_identity(VENDORED_GPT2)
    source = resolve_model_dir(name)
    folder = Path(source).expanduser()
    if is_local(source) and (ident := folder_identity(folder)) is not None:
        return source, ident
    if is_local(source) and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return source, None
    try:
        return source, hf_identity(load_hf_tokenizer(source)[0])
    except UserError:  # offline and not cached, or not loadable: the vocabulary size is still compared
        return source, None


def check_same_tokenizer(name: str, reader, allow: bool) -> None:
    """The data's ids must mean the model tokenizer's tokens: their identities by content (vocabulary + merges, not
    names or files) are equal, or `allow` (--data.allow_tokenizer_mismatch). Folders prepared before the identity was
    recorded (no manifest tokenizer.identity) are compared by vocabulary size only (check_data_fits)."""
    data = reader.manifest.get("tokenizer") or {}
    if allow or not isinstance(data, dict) or data.get("identity") != IDENTITY:
        return
    what, ident = model_tokenizer_identity(name)
    if ident is None or ident == data.get("sha256"):
        return
    raise UserError(f"--model.name={name}: its tokenizer ({what}; identity {ident[:12]}) is not the one "
                    f"{reader.folder / 'manifest.json'} was tokenized with ({data.get('name')}; identity "
                    f"{str(data.get('sha256'))[:12]}), so its ids would mean other tokens; prepare the data with the "
                    f"model's tokenizer (--data.tokenizer), or pass --data.allow_tokenizer_mismatch=true to train on "
                    f"it anyway (the run then carries the data's tokenizer)")


def carried_tokenizer(name: str, reader) -> str | None:
    """The data's saved tokenizer (DATA/tokenizer/, written by prepare) when checkpoints and the export must carry it
    instead of the model's: a model whose tokenizer has another identity (or none). None: the model's own is the
    data's (its files may hold more, e.g. a chat template), or the folder holds no saved tokenizer (older folders)."""
    data = reader.manifest.get("tokenizer") or {}
    saved = data.get("dir") if isinstance(data, dict) else None
    if not isinstance(saved, str) or Path(saved).name != saved or not (reader.folder / saved).is_dir():
        return None
    if data.get("identity") == IDENTITY and model_tokenizer_identity(name)[1] == data.get("sha256"):
        return None
    if data.get("identity") == IDENTITY and data.get("sha256") == GPT2_REFERENCE["identity"]:
        return "gpt2"  # the vendored GPT-2 by content: loaded as such (GPT2TokenizerFast, no conversion)
    from distclm.data.identity import folder_identity

    held = folder_identity(reader.folder / saved)
    if data.get("identity") == IDENTITY and held is not None and held != data.get("sha256"):
        raise UserError(f"{reader.folder / saved}: its tokenizer is not the one {reader.folder / 'manifest.json'} "
                        f"records (identity {held[:12]}, recorded {str(data.get('sha256'))[:12]}); it was changed "
                        f"after prepare: re-run prepare with --overwrite")
    return str(reader.folder / saved)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter elements, each tied tensor once (a ZeRO-3 parameter counts its full size)."""
    from distclm.engine import full_numel

    total = trainable = 0
    for p in model.parameters():
        n = full_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def matmul_parameters(model) -> int:
    """Parameters that take part in a matmul per token: all of them, less embedding lookups.

    An input or position embedding is a lookup (no FLOPs); an embedding tied to the output layer is
    also the LM head's matmul, so it stays in.
    """
    import torch

    from distclm.engine import full_numel

    out = model.get_output_embeddings()
    head = id(out.weight) if out is not None else None
    lookups = sum(full_numel(m.weight) for m in model.modules()
                  if isinstance(m, torch.nn.Embedding) and id(m.weight) != head)
    return parameter_counts(model)[1] - lookups
