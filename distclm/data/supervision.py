"""What gets loss at training time: the checks on a masked folder before training, and the label count of a
global batch.

The loss of an optimizer step is exact whatever the micro-batch, accumulation and world size:

    loss = sum over the global batch's labels of NLL / N,   N = labels in the global batch

N is counted by every rank from the flags of all G blocks of the step (the sampler knows their ids; G x T bytes
read, no collective). A micro-batch's backward gets NLL_sum x (accum x world / N): the engine divides by accum
(accelerate, and DeepSpeed's scale_wrt_gas) and DDP / ZeRO average over the world, which leaves sum / N.
"""

from __future__ import annotations

from distclm.errors import UserError


def masked(readers) -> bool:
    """Whether any of the prepared folders stores which tokens get loss (manifest version 2)."""
    return any(r.manifest.get("data_format") for r in readers)


def global_labels(blocks, sampler, step: int) -> int:
    """N of optimizer step `step` (0-based): labels in the flags of every block of its global batch."""
    from distclm.loss import LOSS

    flags = blocks.flags(sampler.global_indices(step))  # (G, T) uint8
    return int(((flags[:, 1:] & LOSS) != 0).sum())


def model_template(cfg) -> str | None:
    """The chat template of the model's own tokenizer (None for presets and tokenizers without one)."""
    from distclm.data.chat import own_template
    from distclm.model import ARCH_PRESETS, load_model_tokenizer

    if cfg.model.name in ARCH_PRESETS:
        return None
    return own_template(load_model_tokenizer(cfg.model.name, cfg.data.tokenizer))


def check_folders(cfg, readers, own: str | None) -> None:
    """Refuse, with one line naming the reason, a masked folder that would train nothing or the wrong thing."""
    from distclm.data.chat import template_sha256

    for r in readers:
        m = r.manifest
        if not m.get("data_format"):
            continue
        where, train = r.folder / "manifest.json", m["splits"]["train"]
        if train.get("n_supervised", 0) == 0:
            raise UserError(f"{where}: no token of the train split gets loss (data_format {m['data_format']}, "
                            f"train_on {m['train_on']}); re-prepare with --data.train_on=all or other records")
        eot = m.get("end_of_turn") or {}
        if eot.get("id") is not None and train.get("eot_supervised", 0) == 0:
            raise UserError(f"{where}: the end-of-turn token {eot.get('text')!r} (id {eot['id']}) never gets loss, so "
                            f"the model would not learn to stop; check the chat template or --data.overlong")
        data_sha = m.get("chat_template_sha256")
        if own and data_sha and template_sha256(own) != data_sha and not cfg.data.allow_template_mismatch:
            raise UserError(f"{where}: its chat template (sha256 {data_sha[:12]}, {m.get('chat_template_origin')}) "
                            f"differs from the model tokenizer's own (sha256 {template_sha256(own)[:12]}); re-prepare "
                            f"with --data.chat_template=auto --data.tokenizer=<the model's>, or pass "
                            f"--data.allow_template_mismatch=true")


def folder_template(readers) -> str | None:
    """The chat template recorded by the (first) masked folder, for the export and generation."""
    return next((r.manifest.get("chat_template") for r in readers if r.manifest.get("chat_template")), None)
