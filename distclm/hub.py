"""Reaching the Hugging Face Hub, or knowing fast that it cannot be reached.

huggingface_hub retries each file 5 times with back-off: offline, one `from_pretrained` spends
minutes before it fails. One socket probe (3 s) decides instead: when the hub is unreachable,
offline mode is switched on, so cached copies still load and anything else fails at once.
"""

from __future__ import annotations

import os
import socket
import sys
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse


def is_local(name: str) -> bool:
    """A path on this machine (a model or tokenizer folder, a data file), as opposed to a hub id."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def ensure_offline_if_unreachable() -> bool:
    """Probe the hub once; switch huggingface_hub/datasets/transformers to offline mode if it is unreachable.

    Returns whether the hub is reachable.
    """
    if hub_reachable():
        return True
    os.environ["HF_HUB_OFFLINE"] = "1"
    # Libraries read the variable at import: patch the ones already imported.
    for module, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                         ("transformers.utils.hub", "_is_offline_mode")):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, attr) and not callable(getattr(mod, attr)):
            setattr(mod, attr, True)
    return False


def offline_hint(kind: str, flag: str) -> str:
    """The sentence that tells an offline user how to point at a local copy."""
    return (f"the Hugging Face Hub is not reachable from here; download the {kind} on a machine that has "
            f"network access (e.g. `hf download NAME{' --repo-type dataset' if kind == 'dataset' else ''} "
            f"--local-dir DIR`) and pass {flag}=DIR")
