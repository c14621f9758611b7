"""Sampling from a trained model: the tutorial's defaults (100 new tokens, top-k 50, top-p 0.95).

Two ways, by --train.strategy:
- default: one process holds the full weights (an export, a checkpoint's model/ folder, or a hub id)
  and generates; under a multi-process launch only rank 0 reads the prompts and generates.
- zero3 under a launcher: every rank builds the model partitioned (1/world of the weights each) and
  runs `generate` with synchronised forwards (`synced_gpus`): each forward gathers one layer at a time
  from all ranks, so a model that fits no single device still generates. Rank 0 reads the prompts and
  broadcasts them; every rank computes the same tokens (same weights, same seed) and rank 0 prints.
  Memory per rank: its shard of the weights plus the layers being gathered; the cost is an all-gather
  per layer per new token.

Batched prompts are left-padded with eos as the pad token (a decoder continues from the right end
of every row); `transformers.set_seed(gen.seed)` is called right before `generate`, so the same seed
and settings give the same text as a direct `model.generate` call.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import torch

from distclm import dist
from distclm.errors import UserError
from distclm.model import ModelShape


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    """--prompt, else --prompt-file, else stdin when it is not a terminal: one prompt per line."""
    if prompt is not None:
        if not prompt.strip():
            raise UserError("--prompt is empty: give some text to continue")
        return [prompt]
    if prompt_file is not None:
        lines = read_text_lines(prompt_file, "--prompt-file")
    elif not sys.stdin.isatty():
        lines = [line.rstrip("\r\n") for line in sys.stdin]
    else:
        raise UserError("no prompt: pass --prompt \"...\", --prompt-file FILE, or prompts on stdin (one per line)")
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UserError("no prompt: the prompt file or stdin held only empty lines")
    return prompts


def read_text_lines(path: str, flag: str) -> list[str]:
    """A text file's lines; a missing, unreadable or binary file (not UTF-8, or NUL bytes) is one line naming it."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{flag}={path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{flag}={path}: cannot read it ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{flag}={path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                        f"give a text file, one prompt per line") from None
    if "\0" in text:
        raise UserError(f"{flag}={path}: a binary file (a NUL byte at offset {text.index(chr(0))}), not text; "
                        f"give a text file, one prompt per line")
    return [line.rstrip("\r") for line in text.split("\n")]


def generation_kwargs(gen, pad_token_id: int) -> dict:
    """`model.generate` arguments for the --gen.* settings."""
    if not gen.do_sample and gen.num_return_sequences > 1:
        raise UserError(f"--gen.num_return_sequences={gen.num_return_sequences} needs --gen.do_sample=true: "
                        f"greedy decoding has one answer per prompt")
    kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                  num_return_sequences=gen.num_return_sequences, pad_token_id=pad_token_id)
    if gen.do_sample:
        kwargs.update(top_k=gen.top_k, top_p=gen.top_p, temperature=gen.temperature)
    else:  # greedy: the model folder's sampling defaults (generation_config.json) must not apply
        kwargs.update(top_k=None, top_p=None, temperature=None)
    return kwargs


@contextlib.contextmanager
def chat_template_errors() -> Iterator[None]:
    """A chat template that fails (syntax, or an error while rendering) is the user's to fix: one line."""
    from distclm.data.chat import TemplateFailed

    try:
        yield
    except TemplateFailed as exc:
        raise UserError(f"--gen.chat: the model's chat template failed: {exc}") from None


def chat_setup(tokenizer, data_dir: str | None) -> tuple[str, list[int]]:
    """--gen.chat: the template (the model tokenizer's own, else the one recorded by --data.dir) and the ids that
    end an answer (EOS and the template's end-of-turn token)."""
    from distclm.data import chat

    template = chat.own_template(tokenizer)
    if template is None and data_dir:
        from distclm.data.blocks import read_manifest

        m = read_manifest(str(data_dir).split(",")[0])
        # prompt_completion data has no template: the prompt as it is, the completion closed by EOS
        template = chat.PLAIN_TEMPLATE if m.get("data_format") == "prompt_completion" else m.get("chat_template")
    if template is None:
        raise UserError("--gen.chat=true: the model's tokenizer has no chat template and no --data.dir of chat data "
                        "records one; give --data.dir=<the prepared chat folder>")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    _, eot = chat.end_of_turn(template, chat_specials(tokenizer), encode)
    return template, sorted({tokenizer.eos_token_id, *([eot] if eot is not None else [])})


def chat_specials(tokenizer) -> dict:
    return {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token or ""}


def generate(model, tokenizer, prompts: list[str], gen, device=None, synced: bool = False,
             chat: tuple[str, list[int]] | None = None) -> list[list[str]]:
    """For each prompt, `num_return_sequences` full texts (prompt + continuation). `synced`: every rank of a
    ZeRO-3 group runs this together (forwards continue until all ranks are done). `chat` (template, stop ids):
    each prompt is a user turn rendered with the template and its generation prompt, tokenized as in training
    (no special tokens added beyond the template's); generation stops at a stop id; only the answer is returned."""
    from transformers import set_seed

    from distclm.data.chat import render

    device = device or next(model.parameters()).device
    tokenizer.padding_side = "left"  # a decoder continues from the right end of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = generation_kwargs(gen, tokenizer.pad_token_id)
    texts_in = prompts if chat is None else \
        [render(chat[0], [{"role": "user", "content": p}], True, chat_specials(tokenizer)) for p in prompts]
    if chat is not None:
        kwargs["eos_token_id"] = chat[1]
    # verbose=False: a prompt longer than the model gets our one-line error below, not a tokenizer warning too
    enc = tokenizer(texts_in, return_tensors="pt", padding=True, verbose=False,
                    add_special_tokens=chat is None).to(device)  # (P, longest prompt)
    limit = ModelShape.of(model.config).max_positions
    if limit and enc["input_ids"].shape[1] + gen.max_new_tokens > limit:
        raise UserError(f"the longest prompt ({enc['input_ids'].shape[1]} tokens) + --gen.max_new_tokens="
                        f"{gen.max_new_tokens} exceeds the model's {limit} positions; shorten the prompt or "
                        f"lower --gen.max_new_tokens")
    model.eval()
    set_seed(gen.seed)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs, synced_gpus=synced)  # (P * n, longest prompt + new)
    if chat is not None:  # the answer only: the new tokens (the stop token is special or cut off at decode)
        out = out[:, enc["input_ids"].shape[1]:]
        out = [row[:next((i for i, t in enumerate(row.tolist()) if t in chat[1]), len(row))] for row in out]
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    n = gen.num_return_sequences
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def generate_command(inv) -> int:
    cfg, prompt_file = inv.cfg, inv.extras.get("prompt_file")
    from distclm.ds_config import zero_stage

    if not cfg.model.name:
        raise UserError("--model.name is required: a run dir, a Hugging Face folder or a hub id")
    partitioned = zero_stage(cfg.train.strategy) == 3 and dist.world_size() > 1
    if not partitioned and not dist.is_rank0():
        return 0  # rank 0 generates from full weights; reading stdin here too would steal its prompts
    prompts = read_prompts(cfg.gen.prompt, prompt_file) if dist.is_rank0() else None
    generation_kwargs(cfg.gen, 0)  # bad --gen.* settings fail before the model loads
    from distclm.model import quiet_loading

    quiet_loading()
    if partitioned:
        model, device, engine = _partitioned(cfg)
        prompts = engine.broadcast(prompts)
    else:
        from distclm.model import build_model

        device = dist.device()
        model, engine = build_model(cfg.model.name, cfg.train.seed, cfg.model.trust_remote_code).to(device), None
    try:
        from distclm.model import load_model_tokenizer

        tokenizer = load_model_tokenizer(cfg.model.name, cfg.data.tokenizer)
        with chat_template_errors():
            chat = chat_setup(tokenizer, cfg.data.dir) if cfg.gen.chat else None
            if chat is None and dist.is_rank0():
                chat_hint(tokenizer)
            results = generate(model, tokenizer, prompts, cfg.gen, device, synced=engine is not None, chat=chat)
    finally:
        if engine is not None:
            engine.close()
    if dist.is_rank0():
        print_samples(prompts, results, chat=chat is not None)
    return 0


def chat_hint(tokenizer) -> None:
    """A model with a chat template (a chat-trained run's export carries its template) continues raw text when
    --gen.chat is off: say that the chat mode exists."""
    from distclm.data import chat

    if chat.own_template(tokenizer) is not None:
        print("distclm: note: this model has a chat template (a chat-trained model?): --gen.chat=true renders the "
              "prompt as a user turn and prints only the answer; without it the prompt is continued as plain text",
              file=sys.stderr)


def _partitioned(cfg):
    """ZeRO-3: the model built partitioned on every rank, wrapped for forwards (see the module docstring)."""
    from distclm.engine import Engine
    from distclm.model import ModelShape, build_model, load_config

    shape = ModelShape.of(load_config(cfg.model.name, cfg.model.trust_remote_code))
    engine = Engine.start(cfg.train, shape.hidden_size, training=False)
    engine.wrap_for_inference(build_model(cfg.model.name, cfg.train.seed, cfg.model.trust_remote_code))
    return engine.module, engine.device, engine


def empty_answer(text: str) -> str | None:
    """Why a chat answer has nothing to print (None when it has)."""
    if not text:
        return "the model ended its answer at once (0 new tokens)"
    if not text.strip():
        return f"the model's answer is only whitespace ({len(text)} characters: {text!r})"
    return None


def print_samples(prompts: list[str], results: list[list[str]], chat: bool = False) -> None:
    """Each sample on stdout; with --gen.chat an empty or whitespace-only answer is said on stderr instead of a
    blank line."""
    for samples in results:
        for i, text in enumerate(samples):
            if len(samples) > 1:
                print(f"--- sample {i + 1}/{len(samples)}")
            why = empty_answer(text) if chat else None
            if why is not None:
                sys.stdout.flush()
                print(f"distclm: note: {why}", file=sys.stderr)
            else:
                print(text)
        if len(prompts) > 1:
            print()
