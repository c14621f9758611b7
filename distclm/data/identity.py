"""Identity by content: what a prepared folder was made from (its input bytes, its tokenizer's vocabulary), so that
a changed input is never reused or resumed, and data of one tokenizer is never trained silently with another's.

    input      [file name, bytes, sha256 of the raw bytes] per local file, in reading order (hashed in a pass of its
               own: a resume must know the bytes before it trusts its partial shards); embedded corpora by content;
               a hub dataset by id + revision
    tokenizer  vocabulary_sha256: the id -> token table (added tokens included) and the merges, as canonical JSON;
               the same for a save_pretrained folder and the vendored vocab.json + merges.txt of that vocabulary
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from distclm.data import sources
from distclm.data.blocks import file_sha256
from distclm.errors import UserError

# The vendored files hold no tokenizer_config.json; a copy of them gets this one, so transformers loads it as
# `load_hf_tokenizer("gpt2")` does (GPT2TokenizerFast, 1024 positions).
GPT2_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
               "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
# What a tokenizer folder may hold: hashed (files_sha256) and copied into a prepared folder's tokenizer/.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "tokenizer.model", "vocab.txt", "chat_template.jinja", "chat_template.json")
IDENTITY = "vocab+merges/1"  # names what `vocabulary_sha256` hashes (a manifest's tokenizer.identity)


def vocabulary_sha256(vocab: dict[str, int], merges: list, added: dict[str, int]) -> str:
    """The identity of a tokenizer by content: sha256 of canonical JSON {"tokens": [[id, token], ...] by id (the model's
    vocabulary with the added tokens), "merges": [[left, right], ...] in order}. Names, file layout, special-token
    flags and settings that do not change what an id means are not part of it."""
    table = sorted((int(i), t) for t, i in {**vocab, **added}.items())
    pairs = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    text = json.dumps({"tokens": table, "merges": pairs}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def state_identity(state: dict) -> str:
    """`vocabulary_sha256` of a tokenizer.json (the `tokenizers` library's serialised state)."""
    model = state.get("model") or {}
    vocab = model.get("vocab") or {}
    if isinstance(vocab, list):  # Unigram: [[token, score], ...], the id is the position
        vocab = {entry[0]: i for i, entry in enumerate(vocab)}
    added = {t["content"]: t["id"] for t in state.get("added_tokens") or []}
    return vocabulary_sha256(vocab, model.get("merges") or [], added)


def folder_identity(folder: Path) -> str | None:
    """`vocabulary_sha256` of a tokenizer folder, read from its files (no transformers): tokenizer.json, else
    vocab.json + merges.txt (+ added_tokens.json); None when it holds neither."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return state_identity(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")))
    if not (folder / "vocab.json").is_file():
        return None
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges_file, added_file = folder / "merges.txt", folder / "added_tokens.json"
    merges = [line for line in merges_file.read_text(encoding="utf-8").split("\n")
              if line and not line.startswith("#version")] if merges_file.is_file() else []
    added = json.loads(added_file.read_text(encoding="utf-8")) if added_file.is_file() else {}
    return vocabulary_sha256(vocab, merges, added)


def hf_identity(hf) -> str:
    """`vocabulary_sha256` of a loaded transformers fast tokenizer."""
    return state_identity(json.loads(hf.backend_tokenizer.to_str()))


def input_identity(spec: sources.SourceSpec) -> list:
    """The input by content: [file name, bytes, sha256 of its raw bytes] per local file, in reading order (not
    mtimes or absolute paths: the manifest must not depend on them). The embedded corpora by their content too; a
    hub dataset is its id + revision (in the settings). Hashed in a pass of its own before reading, so that a resume
    knows the bytes its partial shards were made from (bench/prepare.py measures it)."""
    if spec.source == "pydoc":
        from pydoc_data.topics import topics

        text = "\0".join(f"{name}\0{topics[name]}" for name in sorted(topics)).encode("utf-8", "surrogatepass")
        return [["pydoc_data.topics", len(text), hashlib.sha256(text).hexdigest()]]
    if spec.source == "pydoc-chat":
        return [[sources.PYDOC_CHAT.name, sources.PYDOC_CHAT.stat().st_size, file_sha256(sources.PYDOC_CHAT)]]
    if not sources.is_local_source(spec.source):
        return []
    return [[os.path.basename(f), os.path.getsize(f), file_sha256(Path(f))] for f in sources.local_files(spec.source)]


def changed_inputs(old: list | None, new: list) -> str:
    """' (input changed since: FILE, ...)' naming the input files whose recorded identity differs, else ''."""
    if not isinstance(old, list) or old == new:
        return ""
    was = {f[0]: f for stream in old for f in stream if isinstance(f, list) and f}
    now = {f[0]: f for stream in new for f in stream}
    names = sorted(n for n in now if n in was and was[n] != now[n]) + sorted(set(now) ^ set(was))
    return f" (input changed since: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''})" if names else ""




def save_tokenizer(tok, dest: Path) -> None:
    """The tokenizer into `dest` (a new folder), loadable by `load_hf_tokenizer(dest)`: a local folder's tokenizer files
    copied as they are (the vendored GPT-2 with GPT2_CONFIG beside them), a hub tokenizer through save_pretrained."""
    import shutil

    if dest.exists():  # a resumed prepare writes it again
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if tok.folder is None:
        tok.hf.save_pretrained(str(dest))
        return
    for name in TOKENIZER_FILES:
        if (tok.folder / name).is_file():
            shutil.copyfile(tok.folder / name, dest / name)
    if tok.name == "gpt2":  # the vendored files: vocab.json + merges.txt only
        (dest / "tokenizer_config.json").write_text(json.dumps(GPT2_CONFIG, indent=2, sort_keys=True) + "\n",
                                                    encoding="utf-8")


def check_unchanged(source: str, specs: list, files: list) -> None:
    """The input hashed again after prepare read it: a file edited meanwhile gives no manifest (its blocks would mix
    old and new text)."""
    now = [input_identity(spec) for spec in specs]
    if now != files:
        raise UserError(f"--data.source={source}: the input changed while prepare read it{changed_inputs(files, now)}; "
                        f"nothing was published; run prepare again with --overwrite once it is final")
