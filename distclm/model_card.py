"""The model card of every export: README.md in the Hub's format (YAML metadata between `---` lines, then Markdown),
written from what the run dir recorded, so that `distclm export` on another machine writes the same card.

    RUN/launch.json      written when training claims its run dir: the command, world size, hardware, versions
    RUN/config.yaml      the resolved hyperparameters          RUN/metrics.jsonl   one record per eval
    DATA/manifest.json   source, format, tokens, blocks, template

The card is public once pushed: no secret (values of the environment's token-like variables, anything shaped like
a Hugging Face / OpenAI / GitHub token) and no path under the user's home (written `~`) appears in it (`scrub`).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path

from distclm import __version__, dist
from distclm.atomic import atomic_write

LAUNCH = "launch.json"
CARD = "README.md"
# Distributions whose versions the card names (read from their metadata; nothing is imported).
FRAMEWORKS = ("torch", "transformers", "accelerate", "deepspeed", "peft", "safetensors", "huggingface_hub")
# Environment variables whose values are secrets by their name; values shaped like tokens are caught by TOKEN_RE.
SECRET_NAME_RE = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
TOKEN_RE = re.compile(r"\b(?:hf_|api_|sk-|ghp_|gho_|github_pat_|xox[abp]-)[A-Za-z0-9_\-]{16,}")


def scrub(text: str) -> str:
    """`text` without the environment's secret values and with the user's home written `~`."""
    for name, value in os.environ.items():
        if len(value) >= 8 and (SECRET_NAME_RE.search(name) or TOKEN_RE.fullmatch(value)):
            text = text.replace(value, "<redacted>")
    text = TOKEN_RE.sub("<redacted>", text)
    for home in {os.path.expanduser("~"), os.environ.get("HOME", "")}:
        home = home.rstrip("/")
        if len(home) > 1:
            text = re.sub(re.escape(home) + r"(?=/|\b|$)", "~", text)
    return text


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"distclm": __version__, "python": platform.python_version()}
    for name in FRAMEWORKS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def hardware(device) -> str:
    """What one rank trained on: the GPU's name, else the CPU's model name (no host names)."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return f"CPU ({platform.processor() or platform.machine()})"


def record_launch(run_dir: Path, engine) -> None:
    """RUN/launch.json (rank 0, when training claims the run dir): the card's command, world, hardware and
    versions, as this launch saw them. argv as given to distclm (under torchrun: each rank's own), secrets
    scrubbed; a resume overwrites it with its own launch."""
    launcher = "torchrun" if os.environ.get("TORCHELASTIC_RUN_ID") else \
        "deepspeed/accelerate" if os.environ.get("LOCAL_RANK") else None
    record = {"argv": [scrub(a) for a in ["distclm", *sys.argv[1:]]], "launcher": launcher,
              "launcher_argv": [scrub(a) for a in launcher_argv()] or None,
              "world_size": engine.world, "nodes": int(os.environ.get("GROUP_WORLD_SIZE") or 0) or None,
              "procs_per_node": int(os.environ.get("LOCAL_WORLD_SIZE") or 1),
              "hardware": hardware(engine.device), "versions": versions()}
    atomic_write(run_dir / LAUNCH, (json.dumps(record, indent=2) + "\n").encode())


def launcher_argv() -> list[str]:
    """The torchrun command line that started this rank (its parent's, read from /proc), else []."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return []
    try:
        words = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
    words = [w for w in words if w]
    head = " ".join(words[:3])
    if "torchrun" not in head and "torch.distributed.run" not in head:
        return []
    if words and Path(words[0]).name.startswith("python"):  # the interpreter's path says nothing about the run
        words[0] = "python"
    return words


def carded(export_run):
    """Decorates export_run: the folder it returns gets its README.md (rank 0), and export/adapter/ its own."""
    @functools.wraps(export_run)
    def export_with_card(run_dir, out=None, engine=None):
        folder = export_run(run_dir, out, engine)
        if dist.is_rank0():
            write_card(Path(run_dir), Path(folder))
        return folder
    return export_with_card


def write_card(run_dir: Path, folder: Path) -> Path:
    atomic_write(folder / CARD, render(run_dir, folder).encode())
    if (folder / "adapter").is_dir():
        atomic_write(folder / "adapter" / CARD, render(run_dir, folder, adapter=True).encode())
    return folder / CARD


# ---------------------------------------------------------------------------------------------
# What the run dir recorded


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _config(run_dir: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def records(run_dir: Path, kind: str) -> list[dict]:
    """The `kind` records (train | eval) of RUN/metrics.jsonl, one per step (the last record of a step counts)."""
    by_step = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("type") == kind:
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def _hub_id(name: str | None) -> str | None:
    """`name` when it is a hub id (not a preset, a folder, or a run dir)."""
    from distclm.hub import is_local
    from distclm.model import ARCH_PRESETS

    if not name or name in ARCH_PRESETS or is_local(name) or name.count("/") > 1:
        return None
    return name


def _license(cfg: dict, base: str | None) -> str | None:
    """--hub.license, else the base model's card's, when that card is on this machine (a folder or the cache)."""
    given = (cfg.get("hub") or {}).get("license")
    if given:
        return given
    name = (cfg.get("model") or {}).get("name") or ""
    card = Path(name) / CARD if name and Path(name).is_dir() else None
    if card is None and base is not None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, CARD)
            card = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - a card we cannot read is a license we do not know
            card = None
    if card is None or not card.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard(card.read_text(encoding="utf-8")).data.to_dict().get("license")
    except Exception:  # noqa: BLE001
        return None


def _manifests(cfg: dict) -> list[dict]:
    dirs = str((cfg.get("data") or {}).get("dir") or "")
    return [m for m in (_json(Path(d.strip()) / "manifest.json") for d in dirs.split(",") if d.strip()) if m]


# ---------------------------------------------------------------------------------------------
# The card


def render(run_dir: Path, folder: Path, adapter: bool = False) -> str:
    import yaml

    from distclm.checkpoint import complete_checkpoints

    cfg, launch = _config(run_dir), _json(run_dir / LAUNCH)
    found = complete_checkpoints(run_dir)
    meta = _json(found[-1] / "meta.json") if found else {}
    manifests, evals, trains = _manifests(cfg), records(run_dir, "eval"), records(run_dir, "train")
    model, train, lora = cfg.get("model") or {}, cfg.get("train") or {}, cfg.get("lora") or {}
    base = _hub_id(model.get("name"))
    datasets = sorted({s for m in manifests for s in [_hub_id((m.get("source") or {}).get("source"))]
                       if s and s != "pydoc"})  # pydoc: Python's own text, embedded, not a hub dataset
    license_ = _license(cfg, base)
    metadata = {"library_name": "distclm", "pipeline_tag": "text-generation",
                **({"base_model": base} if base else {}), **({"license": license_} if license_ else {}),
                **({"datasets": datasets} if datasets else {}),
                "tags": ["distclm", "causal-lm", *(["lora", "peft"] if lora.get("r") else [])]}
    name = folder.name if folder.name not in ("export", "adapter") else run_dir.name
    what = "the LoRA adapter (load it with `peft.PeftModel.from_pretrained(base, DIR)`)" if adapter else \
        "the merged model" if lora.get("r") else "the model"
    lines = [f"# {name}", "",
             f"A causal language model fine-tuned with [distclm](https://pypi.org/project/distclm/) {__version__}"
             f" from `{model.get('name') or 'unknown'}`"
             f"{' (random init from the preset: no pretrained weights)' if _is_preset(model.get('name')) else ''}."
             f" This folder holds {what}.", "",
             "```python", "from transformers import pipeline", "",
             "generate = pipeline('text-generation', model='REPO_OR_DIR')",
             "print(generate('Hello', max_new_tokens=50, do_sample=True, top_k=50, top_p=0.95)[0]['generated_text'])",
             "```", ""]
    if not license_:
        lines += ["License: not recorded (the base model's card is not on this machine): set `--hub.license` or "
                  "add `license:` to this card's metadata before sharing.", ""]
    lines += _data_section(manifests, cfg)
    lines += _results_section(evals, trains[-1] if trains else {}, meta)
    lines += _setup_section(train, meta, launch)
    trained = {k: cfg[k] for k in ("model", "data", "lora", "train", "eval") if k in cfg}
    if not lora.get("r"):
        trained.pop("lora", None)
    lines += ["## Hyperparameters (as resolved)", "", "```yaml", yaml.safe_dump(trained, sort_keys=False).rstrip(),
              "```", ""]
    body = "\n".join(lines)
    head = yaml.safe_dump(metadata, sort_keys=False)
    return scrub(f"---\n{head}---\n\n{body}")


def _is_preset(name: str | None) -> bool:
    from distclm.model import ARCH_PRESETS

    return name in ARCH_PRESETS


def _data_section(manifests: list[dict], cfg: dict) -> list[str]:
    lines = ["## Data", ""]
    if not manifests:
        return lines + ["The prepared data folder was not on this machine when this card was written.", ""]
    weights = (cfg.get("data") or {}).get("weights")
    for m in manifests:
        src = m.get("source") or {}
        fmt = m.get("data_format") or "text"
        if fmt == "text":
            template = "none (plain text" + (", EOS between documents)" if m.get("eos_token_id") is not None else ")")
        else:
            template = (f"{m.get('chat_template_origin') or 'chat template'} (sha256 {m.get('chat_template_sha256')}), "
                        f"loss on {m.get('train_on')}, overlong samples {m.get('overlong')}")
        lines += [f"- source: `{src.get('source')}`" + (f" (config {src['config']})" if src.get("config") else "")
                  + (f", split {src.get('split')}" if src.get("split") else "")
                  + (f", revision {src['revision']}" if src.get("revision") else "")
                  + (f", text field `{src['text_field']}`" if fmt == "text" and src.get("text_field") else "")
                  + (f", first {src['max_docs']} documents" if src.get("max_docs") else ""),
                  f"- format: {fmt}; template: {template}",
                  f"- tokenizer: `{(m.get('tokenizer') or {}).get('name')}`, {m.get('block_size')}-token blocks "
                  f"({m.get('dtype')})", "",
                  "| split | documents | tokens | blocks |", "|---|---|---|---|"]
        for split, info in (m.get("splits") or {}).items():
            lines.append(f"| {split} | {info.get('n_docs')} | {info.get('n_tokens')} | {info.get('n_blocks')} |")
        lines.append("")
    if weights:
        lines += [f"Mixture weights: {weights}.", ""]
    return lines


def _results_section(evals: list[dict], last: dict, meta: dict) -> list[str]:
    """Every eval of the run, and its last logged training loss (from metrics.jsonl: the same card whenever and
    wherever the run is exported)."""
    lines = ["## Results", ""]
    if meta.get("step"):
        lines += [f"Trained {meta['step']} optimizer steps ({meta.get('samples_consumed')} blocks)"
                  + (f"; training loss {last['loss']:.4f} at step {last['step']}." if last.get("loss") is not None
                     else "."), ""]
    if not evals:
        return lines + ["No evaluation was recorded (RUN/metrics.jsonl holds no eval record).", ""]
    keys = [k for k in evals[-1] if k.startswith("eval_") and isinstance(evals[-1][k], (int, float))]
    lines += ["Evaluation on the held-out split (token-weighted over all ranks; perplexity = exp(loss)):", "",
              "| step | epoch | " + " | ".join(k[5:] for k in keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for rec in evals:
        cells = [_num(rec.get(k)) for k in keys]
        lines.append(f"| {rec.get('step')} | {_num(rec.get('epoch'))} | " + " | ".join(cells) + " |")
    return lines + [""]


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _setup_section(train: dict, meta: dict, launch: dict) -> list[str]:
    world = meta.get("world_size") or launch.get("world_size")
    lines = ["## Training setup", "",
             f"- strategy: {meta.get('strategy') or train.get('strategy')}"
             + (f", offload {train['offload']}" if train.get("offload") not in (None, "none") else "")
             + f"; world size {world}"
             + (f" ({launch['nodes']} node(s) x {launch['procs_per_node']})" if launch.get("nodes") else "")
             + (f", launched by {launch['launcher']}" if launch.get("launcher") else ""),
             f"- precision: {train.get('precision')}",
             f"- hardware: {launch.get('hardware') or 'not recorded'}"]
    if launch.get("versions"):
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in launch["versions"].items()))
    if launch.get("launcher_argv"):
        lines += ["", "The command (on each node):", "", "```bash", shlex.join(launch["launcher_argv"]), "```"]
    elif launch.get("argv"):
        lines += ["", "The command (as distclm received it; under a launcher, on each rank):", "", "```bash",
                  shlex.join(launch["argv"]), "```"]
    return lines + [""]
