"""Sampling from a trained model: the tutorial's defaults (100 new tokens, top-k 50, top-p 0.95).

Generation runs on one process from full weights (an export, a checkpoint's consolidated model
folder, or a hub id), so a ZeRO-3 run never has to keep its ranks in step through `generate`.
Under a multi-process launch only rank 0 generates; the other ranks return at once.
"""

from __future__ import annotations

import sys

import torch

from distclm import dist
from distclm.errors import UserError


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    """--prompt, else --prompt-file, else stdin when it is not a terminal: one prompt per line."""
    if prompt is not None:
        return [prompt]
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as fh:
                lines = [line.rstrip("\n") for line in fh]
        except FileNotFoundError:
            raise UserError(f"--prompt-file={prompt_file}: no such file") from None
    elif not sys.stdin.isatty():
        lines = [line.rstrip("\n") for line in sys.stdin]
    else:
        raise UserError("no prompt: pass --prompt \"...\", --prompt-file FILE, or prompts on stdin (one per line)")
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UserError("no prompt: the prompt file or stdin held only empty lines")
    return prompts


def generate(model, tokenizer, prompts: list[str], gen, device=None) -> list[list[str]]:
    """For each prompt, `num_return_sequences` full texts (prompt + continuation)."""
    from transformers import set_seed

    device = device or next(model.parameters()).device
    tokenizer.padding_side = "left"  # a decoder continues from the right end of every row
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    set_seed(gen.seed)
    kwargs = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                  num_return_sequences=gen.num_return_sequences, pad_token_id=tokenizer.pad_token_id)
    if gen.do_sample:
        kwargs.update(top_k=gen.top_k, top_p=gen.top_p, temperature=gen.temperature)
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)  # (len(prompts) * n, prompt_len + new)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    n = gen.num_return_sequences
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def generate_command(cfg, prompt_file: str | None = None) -> int:
    from distclm.model import load_model, load_model_tokenizer

    if not cfg.model.name:
        raise UserError("--model.name is required: a run dir, a Hugging Face folder or a hub id")
    prompts = read_prompts(cfg.gen.prompt, prompt_file)
    if not dist.is_rank0():
        return 0
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
