"""Sampling from a trained model: the tutorial's defaults (100 new tokens, top-k 50, top-p 0.95).

Generation runs on one process from full weights (an export, a checkpoint's model/ folder, which
holds the consolidated weights even for ZeRO-3 runs, or a hub id), so a ZeRO-3 run never has to
keep its ranks in step through `generate`. Under a multi-process launch only rank 0 reads the
prompts and generates; the other ranks return at once.

Batched prompts are left-padded with eos as the pad token (a decoder continues from the right end
of every row); `transformers.set_seed(gen.seed)` is called right before `generate`, so the same seed
and settings give the same text as a direct `model.generate` call.
"""

from __future__ import annotations

import sys

import torch

from distclm import dist
from distclm.errors import UserError


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    """--prompt, else --prompt-file, else stdin when it is not a terminal: one prompt per line."""
    if prompt is not None:
        if not prompt.strip():
            raise UserError("--prompt is empty: give some text to continue")
        return [prompt]
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as fh:
                lines = [line.rstrip("\r\n") for line in fh]
        except FileNotFoundError:
            raise UserError(f"--prompt-file={prompt_file}: no such file") from None
    elif not sys.stdin.isatty():
        lines = [line.rstrip("\r\n") for line in sys.stdin]
    else:
        raise UserError("no prompt: pass --prompt \"...\", --prompt-file FILE, or prompts on stdin (one per line)")
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UserError("no prompt: the prompt file or stdin held only empty lines")
    return prompts


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


def generate(model, tokenizer, prompts: list[str], gen, device=None) -> list[list[str]]:
    """For each prompt, `num_return_sequences` full texts (prompt + continuation)."""
    from transformers import set_seed

    device = device or next(model.parameters()).device
    tokenizer.padding_side = "left"  # a decoder continues from the right end of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = generation_kwargs(gen, tokenizer.pad_token_id)
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)  # (P, longest prompt)
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit and enc["input_ids"].shape[1] + gen.max_new_tokens > limit:
        raise UserError(f"the longest prompt ({enc['input_ids'].shape[1]} tokens) + --gen.max_new_tokens="
                        f"{gen.max_new_tokens} exceeds the model's {limit} positions; shorten the prompt or "
                        f"lower --gen.max_new_tokens")
    model.eval()
    set_seed(gen.seed)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)  # (P * n, longest prompt + new)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    n = gen.num_return_sequences
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def quiet_loading() -> None:
    """No "Loading weights" progress bar on stderr: a command's output is its result (and its one error line)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def generate_command(cfg, prompt_file: str | None = None) -> int:
    from distclm.model import load_model, load_model_tokenizer

    if not cfg.model.name:
        raise UserError("--model.name is required: a run dir, a Hugging Face folder or a hub id")
    if not dist.is_rank0():
        return 0  # rank 0 generates from full weights; reading stdin here too would steal its prompts
    prompts = read_prompts(cfg.gen.prompt, prompt_file)
    generation_kwargs(cfg.gen, 0)  # bad --gen.* settings fail before the model loads
    quiet_loading()
    model = load_model(cfg.model.name, cfg.model.trust_remote_code)
    tokenizer = load_model_tokenizer(cfg.model.name, cfg.data.tokenizer)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    for prompt, samples in zip(prompts, generate(model, tokenizer, prompts, cfg.gen, device)):
        for i, text in enumerate(samples):
            if len(samples) > 1:
                print(f"--- sample {i + 1}/{len(samples)}")
            print(text)
        if len(prompts) > 1:
            print()
    return 0
