"""The `distclm` command line: parse the config, run one command, turn user errors into one line + exit 2.

    distclm prepare  --data.source=SRC --data.dir=OUT
    distclm train    --data.dir=OUT --model.name=MODEL

`COMMANDS` is the one table of commands: each names the function that runs it, beside its subject
(distclm/data/prepare.py for prepare, distclm/export.py for export, ...).

Every config field is a flag `--section.key=value` (or `--section.key value`); `--preset=NAME` and
`--config FILE.yaml` load bundles of them; precedence: defaults < preset < file < flags.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from distclm import __version__, config, dist, exit_code, safe_load
from distclm.errors import UserError


@dataclass(frozen=True)
class Command:
    summary: str  # one line, in `distclm --help`
    usage: str  # the first line of `distclm COMMAND --help`
    run: str  # "module:function" taking the Invocation -> exit code; imported only when the command runs

    def __call__(self, inv: "Invocation") -> int:
        import importlib

        module, function = self.run.split(":")
        return getattr(importlib.import_module(module), function)(inv)


COMMANDS: dict[str, Command] = {
    "prepare": Command("Tokenize documents and pack them into block shards + manifest.json.",
                       "distclm prepare --data.source=SRC --data.dir=OUT [--overwrite]",
                       "distclm.data.prepare:prepare_command"),
    "inspect": Command("Summarise a prepared folder and decode its first block.",
                       "distclm inspect OUT [--verify]",
                       "distclm.data.inspect:inspect_command"),
    "train": Command("Train a causal LM on prepared blocks (1 process, torchrun, deepspeed or accelerate launch).",
                     "distclm train --data.dir=OUT --model.name=MODEL [--run.dir=RUN] "
                     "[--train.strategy=ddp|zero1|zero2|zero3]",
                     "distclm.train:train_command"),
    "eval": Command("Token-weighted perplexity of a model on a prepared split, across any number of processes.",
                    "distclm eval --model.name=RUN|HF_DIR|HUB_ID --data.dir=OUT [--eval.output=result.json]",
                    "distclm.evaluation:eval_command"),
    "generate": Command("Sample text (tutorial defaults: 100 new tokens, top-k 50, top-p 0.95).",
                        "distclm generate --model.name=RUN|HF_DIR|HUB_ID --prompt \"...\" [--prompt-file FILE]",
                        "distclm.generate:generate_command"),
    "export": Command("Write a run's newest complete checkpoint as a Hugging Face folder.",
                      "distclm export RUN [--out DIR]",
                      "distclm.export:export_command"),
    "run": Command("Everything: prepare -> train -> eval -> export -> sample.",
                   "distclm run --preset=demo|eli5-distilgpt2 [overrides]",
                   "distclm.run:run_command"),
    "plan": Command("Per-rank peak memory by part and step time of each strategy; which fits, fastest first, and a "
                    "pick.",
                    "distclm plan --model.name=MODEL [train flags] --plan.world=N [--plan.device_memory=80GB] "
                    "[--plan.output=plan.json]",
                    "distclm.plan_report:plan_command"),
    "doctor": Command("Versions, DeepSpeed ops, launcher env, resolved config; under a launcher, an all-reduce on "
                      "every rank.",
                      "distclm doctor [--train.backend=...] [--train.dist_timeout_s=S]   "
                      "(or: launchers/torchrun.sh doctor)",
                      "distclm.doctor:doctor_command"),
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
    flags, extras, positional = config.split_args(args, EXTRA_FLAGS)
    if extras.get("prompt") is not None:
        flags["gen.prompt"] = extras.pop("prompt")
    if "overwrite" in extras:
        flags["run.overwrite"] = extras.pop("overwrite")
    for name in ("verify", "print_config"):
        if name in extras:
            extras[name] = config.parse_bool(name, extras[name])
    cfg = config.build_config(extras.pop("preset", None), extras.pop("config", None), flags)
    return Invocation(command, cfg, positional, extras, list(args))


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


def main_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"distclm {__version__}: distributed causal-LM fine-tuning", "",
             "usage: distclm COMMAND [--section.key=value ...] [--preset=NAME] [--config FILE.yaml]", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
    lines += ["", "`distclm COMMAND --help` lists every setting with its default."]
    return "\n".join(lines)


def command_help(command: str) -> str:
    lines = [f"usage: {COMMANDS[command].usage}", "", COMMANDS[command].summary, "",
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


def main(argv: list[str] | None = None) -> int:
    exit_code.started()
    try:
        with safe_load.weights_only_loads():  # before any command reads a file: every torch.load is weights-only
            code = run_command(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        exit_code.record(status(exc))
        raise
    except Exception:  # a crash keeps its traceback
        exit_code.record(1)
        raise
    exit_code.record(code)  # for launchers/torchrun.sh, which passes it on instead of torchrun's 1
    return code


def status(exc: SystemExit) -> int:
    """The exit status Python gives a SystemExit: its int, 0 for None, 1 for anything else (which it prints)."""
    return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1


def entry() -> None:
    """The `distclm` command and `python -m distclm.cli`: main(), then dist.end_process, which ends a process
    that formed a process group without the interpreter's teardown. The tests call main() in-process instead."""
    dist.own_process()  # this process is the rank's: a grace past its work (dist.arm_grace) may end it
    try:
        code = main()
    except SystemExit as exc:  # main's own sys.exit, argparse's: the same code a plain exit would give
        code = status(exc)
        if code == 1 and not isinstance(exc.code, int):  # sys.exit("message"): printed, as Python does
            print(exc.code, file=sys.stderr)
    except Exception:  # a crash: its traceback, as Python would print it, and 1
        traceback.print_exc()
        code = 1
    dist.end_process(code)


def run_command(argv: list[str]) -> int:
    try:
        inv = parse(argv)
        if inv is None:
            return 0
        if inv.extras.get("print_config"):
            print(config.to_yaml(inv.cfg), end="")
            return 0
        return COMMANDS[inv.command](inv)
    except UserError as exc:
        print(f"distclm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distclm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `distclm train --help | head`: the reader left; nothing to report
        return 0


if __name__ == "__main__":
    entry()
