"""`distclm run`: prepare -> perplexity before -> train (N processes) -> perplexity after -> export -> sample.

Training runs as a child (`torchrun --nproc_per_node N -m distclm.cli train --config RESOLVED.yaml`),
so the one command uses the same multi-process path as a cluster launch; everything else runs here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from distclm import config as config_mod
from distclm.atomic import check_writable, disk_full_is_one_line
from distclm.errors import UserError


def default_nproc() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def check_reachable(cfg) -> None:
    """Offline with a hub dataset or model: fail at once, saying how to use local copies of both."""
    from distclm.data.sources import EMBEDDED, is_local_source
    from distclm.hub import ensure_offline_if_unreachable, is_local
    from distclm.model import ARCH_PRESETS

    needs = []  # (what, how to fetch it elsewhere, the flag that points at the copy)
    data_ready = (Path(cfg.data.dir or "") / "manifest.json").exists()  # prepare will reuse it
    if cfg.data.source and cfg.data.source not in EMBEDDED and not is_local_source(cfg.data.source) and not data_ready:
        rev = f" --revision {cfg.data.revision}" if cfg.data.revision else ""
        needs.append((f"dataset {cfg.data.source}",
                      f"hf download {cfg.data.source} --repo-type dataset{rev} --local-dir DATA",
                      f"--data.source=DATA/... (the folder of its {cfg.data.split} split's files; "
                      f"same --data.text_field={cfg.data.text_field})"))
    if cfg.model.name and cfg.model.name not in ARCH_PRESETS and not is_local(cfg.model.name):
        needs.append((f"model {cfg.model.name}", f"hf download {cfg.model.name} --local-dir MODEL",
                      "--model.name=MODEL"))
    if not needs or ensure_offline_if_unreachable():
        return
    from huggingface_hub import try_to_load_from_cache  # a cached copy still works offline

    needs = [n for n in needs if not (n[0].startswith("model")
                                      and isinstance(try_to_load_from_cache(cfg.model.name, "config.json"), str))]
    if not needs:
        return
    raise UserError(f"the Hugging Face Hub is not reachable and this run needs the "
                    f"{' and the '.join(what for what, _, _ in needs)}; on a machine with network access run "
                    f"{' and '.join(f'`{how}`' for _, how, _ in needs)}, copy the folders here, then pass "
                    f"{' and '.join(flag for _, _, flag in needs)}")


def train_in_children(cfg, nproc: int) -> None:
    from distclm.dist import free_port
    from distclm.ownership import claim_dir
    from distclm.runlock import LOCK_FILES, held_message, live_holder

    run_dir = Path(cfg.run.dir)
    # The child takes the lock; a folder not a run dir, or one a job holds, is refused here first, before the
    # resolved config is written into it (the folder is marked as a run dir, so the child knows it for its own).
    if (holder := live_holder(run_dir)) is not None:
        raise UserError(held_message(run_dir, holder))
    claim_dir(run_dir, "run", "--run.dir", ignore=LOCK_FILES)
    resolved = run_dir / "run-config.yaml"
    resolved.write_text(config_mod.to_yaml(cfg), encoding="utf-8")
    cmd = [sys.executable, "-m", "distclm.cli", "train", "--config", str(resolved)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "distclm.cli", "train", "--config", str(resolved)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise SystemExit(rc if rc in (2, 143) else 1)


def perplexity_of(model_name: str, cfg, seed: int = 0) -> dict:
    """One-process eval of a model on the validation split (`seed`: the init of a preset model)."""
    from distclm.data.blocks import BlockReader
    from distclm.dist import device
    from distclm.evaluation import eval_blocks, evaluate
    from distclm.model import build_model

    reader = BlockReader(cfg.data.dir)
    blocks = eval_blocks(reader, cfg.eval.split)  # before the model: no validation blocks is refused, not nan
    return evaluate(build_model(model_name, seed, cfg.model.trust_remote_code), blocks, cfg.eval.batch_size, device())


def run_command(inv) -> int:
    cfg = inv.cfg
    from distclm.console import PrepareProgress
    from distclm.data.prepare import RESUMES, prepare
    from distclm.model import quiet_loading
    from distclm.rundir import default_run_dir

    check_reachable(cfg)
    check_writable(cfg.run.dir or "runs", "--run.dir")  # before prepare: data.dir is checked by prepare itself
    quiet_loading()
    say = print
    say(f"== prepare {cfg.data.source} -> {cfg.data.dir}")
    progress = PrepareProgress(interval_s=5.0)
    try:
        with disk_full_is_one_line(f"--data.dir={cfg.data.dir}", cfg.data.dir or ".", RESUMES):
            result = prepare(cfg, progress)
    finally:
        progress.close()
    sp = result.manifest["splits"]
    say(("reused complete " if result.reused else "prepared ") + ", ".join(
        f"{k} {s['n_blocks']:,} blocks" for k, s in sp.items()) + f" of {result.manifest['block_size']} tokens")
    if not cfg.run.dir:
        cfg.run.dir = default_run_dir(cfg)
    before = perplexity_of(cfg.model.name, cfg, seed=cfg.train.seed)
    say(f"== perplexity before training: {before['perplexity']:.2f} (loss {before['loss']:.4f}, "
        f"{before['tokens']:,} validation tokens)")
    nproc = cfg.run.nproc or default_nproc()
    say(f"== train {cfg.model.name} on {nproc} process(es), strategy {cfg.train.strategy} -> {cfg.run.dir}")
    train_in_children(cfg, nproc)
    export = Path(cfg.run.dir) / "export"
    after = perplexity_of(str(export), cfg)
    say(f"== perplexity after training: {after['perplexity']:.2f} (loss {after['loss']:.4f}); "
        f"before/after = {before['perplexity'] / after['perplexity']:.1f}x")
    if cfg.gen.prompt:
        from distclm.generate import generate
        from distclm.model import build_model, load_model_tokenizer

        g = cfg.gen
        model = build_model(str(export), seed=0)
        tok = load_model_tokenizer(str(export), cfg.data.tokenizer)
        chat = None
        if result.manifest.get("data_format") or g.chat:  # a chat folder: the prompt as a user turn, the answer only
            from distclm.generate import chat_setup

            chat = chat_setup(tok, cfg.data.dir)
        text = generate(model, tok, [g.prompt], g, chat=chat)[0][0]
        how = f"top-k {g.top_k}, top-p {g.top_p}, temperature {g.temperature}" if g.do_sample else "greedy"
        say(f"== sample ({how}, {g.max_new_tokens} new tokens, seed {g.seed}):")
        say(text)
    else:
        say("== no sample: set --gen.prompt=\"...\" for one (or run `distclm generate` on the export)")
    from transformers import pipeline as hf_pipeline

    hf_pipeline("text-generation", model=str(export), device="cpu")  # the export loads as is, or this raises
    say(f"== exported to {export}: loaded with transformers.pipeline('text-generation', model='{export}')")
    return 0
