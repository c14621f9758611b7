"""The `distclm` command line: parse the config, run one command, turn user errors into one line + exit 2.

    distclm prepare  --data.source=SRC --data.dir=OUT
    distclm inspect  OUT [--verify]

Every config field is a flag `--section.key=value` (or `--section.key value`); `--preset=NAME` and
`--config FILE.yaml` load bundles of them; precedence: defaults < preset < file < flags.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from distclm import __version__, config
from distclm.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (one-line summary, usage)
    "prepare": ("Tokenize documents and pack them into block shards + manifest.json.",
                "distclm prepare --data.source=SRC --data.dir=OUT [--overwrite]"),
    "inspect": ("Summarise a prepared folder and decode its first block.",
                "distclm inspect OUT [--verify]"),
    "train": ("Train a causal LM on prepared blocks (1 process, torchrun, deepspeed or accelerate launch).",
              "distclm train --data.dir=OUT --model.name=MODEL [--run.dir=RUN] [--train.strategy=ddp|zero1|zero2|zero3]"),
    "eval": ("Token-weighted perplexity of a model on a prepared split, across any number of processes.",
             "distclm eval --model.name=RUN|HF_DIR|HUB_ID --data.dir=OUT [--eval.output=result.json]"),
    "generate": ("Sample text (tutorial defaults: 100 new tokens, top-k 50, top-p 0.95).",
                 "distclm generate --model.name=RUN|HF_DIR|HUB_ID --prompt \"...\" [--prompt-file FILE]"),
    "export": ("Write a run's newest complete checkpoint as a Hugging Face folder.",
               "distclm export RUN [--out DIR]"),
    "run": ("Everything: prepare -> train -> eval -> export -> sample.",
            "distclm run --preset=demo|eli5-distilgpt2 [overrides]"),
    "doctor": ("Versions, DeepSpeed ops, launcher env, resolved config; under a launcher, an all-reduce on every rank.",
               "distclm doctor [--train.backend=...] [--train.dist_timeout_s=S]   (or: launchers/torchrun.sh doctor)"),
    "plan": ("Per-rank peak memory by part and step time of each strategy; which fits, fastest first, and a pick.",
             "distclm plan --model.name=MODEL [train flags] --plan.world=N [--plan.device_memory=80GB] "
             "[--plan.output=plan.json]"),
}

# Flags outside the --section.key scheme: name -> (takes a value, help).
EXTRA_FLAGS: dict[str, tuple[bool, str]] = {
    "preset": (True, f"Named bundle of settings: {', '.join(config.PRESETS)}."),
    "config": (True, "YAML file of settings ({section: {key: value}})."),
    "print-config": (False, "Print the resolved config as YAML and exit."),
    "out": (True, "Output folder (export)."),
    "verify": (False, "Check shard sha256 checksums (inspect, and before training)."),
    "overwrite": (False, "Replace an output that holds other settings (alias of --run.overwrite)."),
    "prompt": (True, "Alias of --gen.prompt."),
    "prompt-file": (True, "File of prompts, one per line (generate)."),
    "local_rank": (True, "Added by the deepspeed launcher; ignored (the environment wins)."),
    "local-rank": (True, "Added by the deepspeed launcher; ignored (the environment wins)."),
}


@dataclass
class Invocation:
    command: str
    cfg: config.Config
    positional: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)


def _bool_fields() -> set[str]:
    return {k for k, (_f, tp) in config.field_specs().items() if config._base_type(tp)[0] is bool}


def parse(argv: list[str]) -> Invocation | None:
    """argv (without the program name) -> Invocation; None when help or version was printed."""
    argv = _drop_local_rank(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main_help())
        return None
    if argv[0] in ("--version", "-V"):
        print(f"distclm {__version__}")
        return None
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        hint = difflib.get_close_matches(command, list(COMMANDS), n=1)
        raise UserError(f"unknown command {command!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + f"; commands: {', '.join(COMMANDS)}")
    if any(a in ("-h", "--help") for a in args):
        print(command_help(command))
        return None
    flags, extras, positional = _split_args(args)
    if extras.get("prompt") is not None:
        flags["gen.prompt"] = extras.pop("prompt")
    if "overwrite" in extras:
        flags["run.overwrite"] = extras.pop("overwrite")
    for name in ("verify", "print_config"):
        if name in extras:
            extras[name] = _as_bool(name, extras[name])
    cfg = config.build_config(extras.pop("preset", None), extras.pop("config", None), flags)
    return Invocation(command, cfg, positional, extras, list(args))


def _split_args(args: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """-> (config fields by dotted name, the other flags, positional arguments), each flag checked by name."""
    specs = config.field_specs()
    bools = _bool_fields()
    flags: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            positional.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        is_field = name in specs
        if not is_field and name not in EXTRA_FLAGS:
            raise UserError(f"unknown flag --{name}" + (config.closest_key(name) if "." in name else
                            _closest_extra(name)))
        takes_value = name not in bools if is_field else EXTRA_FLAGS[name][0]
        if not eq:
            if takes_value and i < len(args) and not args[i].startswith("--"):
                value = args[i]
                i += 1
            elif takes_value:
                raise UserError(f"--{name} expects a value" + (f" (--{name}=VALUE)" if is_field else ""))
            elif i < len(args) and args[i].lower() in config._TRUE | config._FALSE:
                # `--data.eos_between_docs false`: the value form every field accepts; left as a
                # positional it was ignored and the bare flag silently meant true.
                value = args[i]
                i += 1
            else:
                value = "true"
        (flags if is_field else extras)[name if is_field else name.replace("-", "_")] = value
    return flags, extras, positional


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts `--local_rank=N` before the command: the environment says the same."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--local_rank", "--local-rank"):
            skip = "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        out.append(arg)
    return out


def _as_bool(name: str, value: str) -> bool:
    if value.lower() in config._TRUE | config._FALSE:
        return value.lower() in config._TRUE
    raise UserError(f"--{name.replace('_', '-')}: expected true or false, got {value!r}")


def _closest_extra(name: str) -> str:
    import difflib

    match = difflib.get_close_matches(name, list(EXTRA_FLAGS), n=1)
    if match:
        return f" (did you mean --{match[0]}?)"
    return config.closest_key(name)


def main_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"distclm {__version__}: distributed causal-LM fine-tuning", "",
             "usage: distclm COMMAND [--section.key=value ...] [--preset=NAME] [--config FILE.yaml]", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (summary, _) in COMMANDS.items()]
    lines += ["", "`distclm COMMAND --help` lists every setting with its default."]
    return "\n".join(lines)


def command_help(command: str) -> str:
    summary, usage = COMMANDS[command]
    lines = [f"usage: {usage}", "", summary, "",
             "Settings (every command takes every section; precedence: defaults < --preset < --config < flags):"]
    section = None
    rows = config.help_lines()
    width = max(len(flag) for flag, _ in rows)
    for flag, doc in rows:
        head = flag[2:].split(".")[0]
        if head != section:
            section = head
            lines += ["", f"  [{section}]"]
        lines.append(f"  {flag:<{width}}  {doc}")
    lines += ["", "Other flags:"]
    for name, (takes, doc) in EXTRA_FLAGS.items():
        lines.append(f"  {'--' + name + ('=VALUE' if takes else ''):<{width}}  {doc}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_prepare(inv: Invocation) -> int:
    from distclm.console import PrepareProgress
    from distclm.data.prepare import prepare

    progress = PrepareProgress(interval_s=min(inv.cfg.log.interval_s, 5.0), total_docs=inv.cfg.data.max_docs)
    try:
        result = prepare(inv.cfg, progress)
    finally:
        progress.close()
    m = result.manifest
    sp = m["splits"]
    tokens = sum(s["n_tokens"] for s in sp.values())
    if result.reused:
        print(f"prepare: {inv.cfg.data.dir} is complete with these settings; nothing to do "
              f"(--overwrite to redo it)")
    rate = "" if result.reused else f" in {result.seconds:.1f}s ({tokens / max(result.seconds, 1e-9) / 1e6:.2f}M tok/s, {result.backend})"
    print(f"prepared {sum(s['n_docs'] for s in sp.values()):,} docs -> {tokens:,} tokens -> "
          + ", ".join(f"{k} {s['n_blocks']:,} blocks" for k, s in sp.items())
          + f" of {m['block_size']} ({m['dtype']}){rate} -> {inv.cfg.data.dir}")
    return 0


def cmd_inspect(inv: Invocation) -> int:
    from distclm.data.blocks import BlockReader

    folder = inv.positional[0] if inv.positional else inv.cfg.data.dir
    if not folder:
        raise UserError("inspect needs a folder: distclm inspect OUT (or --data.dir=OUT)")
    reader = BlockReader(folder, verify=bool(inv.extras.get("verify")))
    m = reader.manifest
    src = m.get("source", {})
    print(f"folder     {folder}")
    print(f"format     {m['format']} v{m['version']} (distclm {m.get('distclm_version', '?')})")
    print(f"source     {src.get('source')} split={src.get('split')} field={src.get('text_field')} "
          f"max_docs={src.get('max_docs')} revision={src.get('revision')}")
    print(f"tokenizer  {m['tokenizer']['name']} sha256 {m['tokenizer']['sha256'][:16]}  vocab {m['vocab_size']}  "
          f"eos {m['eos_token_id']}")
    print(f"blocks     {m['block_size']} tokens, {m['dtype']}")
    for name, s in m["splits"].items():
        print(f"{name:<10} {s['n_docs']:>9,} docs  {s['n_tokens']:>12,} tokens  {s['n_blocks']:>9,} blocks  "
              f"{len(s['shards'])} shard(s)  dropped tail {s['dropped_tokens']} tokens")
    if inv.extras.get("verify"):
        print("checksums  ok (sha256 of every shard matches the manifest)")
    split = next((s for s in reader.splits.values() if len(s)), None)
    if split is not None:
        first = split[0]
        print(f"first {split.name} block:")
        print(_decode(m["tokenizer"]["name"], first.tolist()))
    reader.close()
    return 0


def _decode(tokenizer: str, ids: list[int]) -> str:
    try:
        from distclm.data.tokenize import load_hf_tokenizer

        hf, _ = load_hf_tokenizer(tokenizer)
        return hf.decode(ids)
    except UserError:
        return f"(tokenizer {tokenizer} not loadable here; ids) {ids}"


def cmd_train(inv: Invocation) -> int:
    from distclm.loop import NonFinite, Preempted
    from distclm.train import train

    try:
        train(inv.cfg)
    except Preempted as exc:
        print(f"distclm: {exc}", file=sys.stderr)
        return 143  # 128 + SIGTERM: retryable under Kubernetes restart policies
    except NonFinite as exc:
        print(f"distclm: error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(inv: Invocation) -> int:
    from distclm.evaluation import eval_command

    return eval_command(inv.cfg)


def cmd_generate(inv: Invocation) -> int:
    from distclm.generate import generate_command

    return generate_command(inv.cfg, inv.extras.get("prompt_file"))


def cmd_export(inv: Invocation) -> int:
    from pathlib import Path

    from distclm.checkpoint import export_run

    run_dir = inv.positional[0] if inv.positional else inv.cfg.run.dir
    if not run_dir:
        raise UserError("export needs a run dir: distclm export RUN [--out DIR]")
    if not Path(run_dir).is_dir():
        raise UserError(f"export: {run_dir}: no such run dir")
    out = export_run(Path(run_dir), inv.extras.get("out"))
    print(f"exported {run_dir} -> {out} (load it with transformers.pipeline('text-generation', model='{out}'))")
    return 0


def cmd_run(inv: Invocation) -> int:
    from distclm.pipeline import run_all

    return run_all(inv.cfg, argv=inv.argv)


def cmd_doctor(inv: Invocation) -> int:
    from distclm.doctor import doctor_command

    return doctor_command(inv.cfg)


HANDLERS: dict[str, Callable[[Invocation], int]] = {
    "prepare": cmd_prepare,
    "inspect": cmd_inspect,
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "export": cmd_export,
    "run": cmd_run,
    "doctor": cmd_doctor,
    "plan": lambda inv: __import__("distclm.plan_cli", fromlist=["plan_command"]).plan_command(inv.cfg),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        inv = parse(argv)
        if inv is None:
            return 0
        if inv.extras.get("print_config"):
            print(config.to_yaml(inv.cfg), end="")
            return 0
        return HANDLERS[inv.command](inv)
    except UserError as exc:
        print(f"distclm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distclm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `distclm train --help | head`: the reader left; nothing to report
        return 0


if __name__ == "__main__":
    sys.exit(main())
