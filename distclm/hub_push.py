"""Pushing an export to the Hugging Face Hub: `distclm export RUN --hub.repo_id=USER/NAME` and, at the end of
training, `--train.push_to_hub=true` (rank 0, after the export and after the process group is gone).

    create_repo(exist_ok) -> create_branch (--hub.revision) -> upload_folder(export/ or export/adapter/)

Everything goes through huggingface_hub's client; the token is its own (HF_TOKEN, else `hf auth login`'s stored
one) and distclm never reads it into a message or a file. What can be known before any upload is checked first,
so that a push that cannot work fails in seconds with one line naming the fix: offline mode, an endpoint that
does not answer (one 3 s socket probe; the client itself retries for minutes), no token, a token the Hub refuses.
The export stays on disk in every case.

A failed push is the command's error in `distclm export` (exit 2, one line). At the end of training it is a
warning and training still exits 0: the run, its checkpoint and its export are complete, and a non-zero code
would make a Kubernetes/Slurm retry policy train again for a fault that only `distclm export RUN --hub.repo_id`
can fix (docs/hub.md).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from distclm import dist
from distclm.errors import UserError
from distclm.ownership import MARKER

ADAPTER = "adapter"  # lora.ADAPTER: the LoRA export's adapter folder
LOGIN = "set HF_TOKEN to a token with write access, or run `hf auth login` (`huggingface-cli login` in older clients)"


class PushFailed(UserError):
    """A push that did not happen; the message names the fix and where the export stays."""


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or \
        os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    parts = urlparse(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                      timeout=timeout_s):
            return True
    except (OSError, TypeError):
        return False


def check_can_push(folder: Path) -> None:
    """Refuse, in seconds and before any upload, a push that cannot work."""
    from huggingface_hub import get_token

    stays = f"the export stays in {folder}"
    if _offline():
        raise PushFailed(f"push refused: HF_HUB_OFFLINE is set (offline mode); unset it (or HF_HUB_OFFLINE=0) on a "
                         f"machine that reaches the Hub; {stays}")
    if not _reachable(endpoint()):
        raise PushFailed(f"push failed: the Hugging Face Hub ({endpoint()}) is not reachable from here; push from a "
                         f"machine that reaches it with `distclm export RUN --hub.repo_id=...` (where there is no "
                         f"network, HF_HUB_OFFLINE=1 makes this refusal immediate); {stays}")
    if not get_token():
        raise PushFailed(f"push refused: no Hugging Face token; {LOGIN}; {stays}")


def push(folder: Path, hub, step: int | None = None) -> str:
    """Upload the export `folder` (its adapter/ alone with --hub.adapter_only) to --hub.repo_id -> the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    source = folder / ADAPTER if hub.adapter_only else folder
    if hub.adapter_only and not source.is_dir():
        raise PushFailed(f"--hub.adapter_only=true: {folder} has no {ADAPTER}/ (not a LoRA run: --lora.r=0); push "
                         f"the whole export without it")
    check_can_push(folder)
    api = HfApi(endpoint=endpoint())
    message = hub.commit_message or f"distclm export{f' at step {step}' if step else ''}" \
                                    f"{' (LoRA adapter)' if hub.adapter_only else ''}"
    try:
        repo = api.create_repo(hub.repo_id, private=hub.private, exist_ok=True, repo_type="model")
        if hub.revision and hub.revision != "main":
            api.create_branch(repo.repo_id, branch=hub.revision, exist_ok=True, repo_type="model")
        # The merged model alone: its adapter/ is what --hub.adapter_only pushes. The ownership marker says who
        # wrote a folder on this machine; on the Hub it means nothing.
        ignore = [MARKER, f"*/{MARKER}"] + ([] if hub.adapter_only else [f"{ADAPTER}/*"])
        info = api.upload_folder(repo_id=repo.repo_id, folder_path=str(source), repo_type="model",
                                 revision=hub.revision, commit_message=message, ignore_patterns=ignore)
    except HfHubHTTPError as exc:
        raise PushFailed(_http_refusal(exc, hub.repo_id, folder)) from None
    except Exception as exc:  # noqa: BLE001 - a connection dropped mid-way (httpx), a malformed answer: one line
        raise PushFailed(f"push to {hub.repo_id} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; "
                         f"the export stays in {folder}") from None
    return info.commit_url if hasattr(info, "commit_url") else str(info)


def _http_refusal(exc, repo_id: str, folder: Path) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    stays = f"the export stays in {folder}"
    if status in (401, 403):
        return (f"push to {repo_id} refused by {endpoint()} (HTTP {status}: the token is missing, invalid or "
                f"read-only, or cannot write to that namespace); {LOGIN}; {stays}")
    return f"push to {repo_id} failed (HTTP {status}): {str(exc).splitlines()[0][:200]}; {stays}"


def push_export(cfg, run_dir, folder: Path) -> None:
    """`distclm export RUN --hub.repo_id=...`: push, or say nothing when no repo is named."""
    if not cfg.hub.repo_id:
        if cfg.hub.adapter_only or cfg.hub.revision or cfg.hub.commit_message or cfg.hub.private:
            raise UserError("--hub.* settings need --hub.repo_id=USER/NAME to push to")
        return
    print(f"pushed {folder} to {cfg.hub.repo_id}: {push(folder, cfg.hub, _step(run_dir))}")


def before_training(cfg) -> None:
    """--train.push_to_hub=true, before training starts: no --hub.repo_id is refused (it costs nothing now); a push
    that could not work (offline, unreachable, no token) is a warning on rank 0, hours before the push fails."""
    if not cfg.train.push_to_hub:
        return
    if not cfg.hub.repo_id:
        raise UserError("--train.push_to_hub=true needs --hub.repo_id=USER/NAME (the Hub repo to push the export to)")
    if cfg.hub.adapter_only and not cfg.lora.r:
        raise UserError("--hub.adapter_only=true needs a LoRA run (--lora.r > 0): without one the export has no "
                        "adapter; drop --hub.adapter_only to push the whole model")
    if dist.is_rank0():
        try:
            check_can_push(Path("RUN/export"))
        except PushFailed as exc:
            print(f"distclm: warning: --train.push_to_hub=true: {str(exc).split('; the export stays')[0]}; training "
                  f"goes on, and its push at the end will fail the same way unless that is fixed", file=sys.stderr)


def after_training(cfg, run_dir: str | None) -> None:
    """--train.push_to_hub=true, on rank 0 after training: push RUN/export, or warn (training's result stands)."""
    if not cfg.train.push_to_hub or not dist.is_rank0() or not run_dir:
        return
    folder = Path(run_dir) / "export"
    try:
        print(f"pushed {folder} to {cfg.hub.repo_id}: {push(folder, cfg.hub, _step(run_dir))}")
    except PushFailed as exc:
        print(f"distclm: warning: {exc}; training is complete: push it later with "
              f"`distclm export {run_dir} --hub.repo_id={cfg.hub.repo_id}`", file=sys.stderr)


def _step(run_dir) -> int | None:
    """The step of the checkpoint an export of `run_dir` holds (its newest complete one)."""
    from distclm.checkpoint import complete_checkpoints

    found = complete_checkpoints(Path(run_dir))
    return int(found[-1].name.split("-")[-1]) if found else None
