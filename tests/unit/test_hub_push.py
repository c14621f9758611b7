"""The push's refusals that need no process and no server (in this process, with huggingface_hub's own settings
patched): --train.push_to_hub without a repo, offline mode, an endpoint nobody listens on, no token. The real
client against a stand-in of the Hub: tests/e2e/test_hub_push.py."""

from __future__ import annotations

import socket
import time

import pytest

from distclm import hub_push
from distclm.config import build_config
from distclm.errors import UserError


def cfg(**flags):
    return build_config(None, None, flags)


def test_push_to_hub_without_a_repo_is_refused_before_training():
    with pytest.raises(UserError, match=r"--train.push_to_hub=true needs --hub.repo_id=USER/NAME"):
        hub_push.before_training(cfg(**{"train.push_to_hub": "true"}))
    with pytest.raises(UserError, match=r"--hub.adapter_only=true needs a LoRA run \(--lora.r > 0\)"):
        hub_push.before_training(cfg(**{"train.push_to_hub": "true", "hub.repo_id": "me/x", "hub.adapter_only": "true"}))
    hub_push.before_training(cfg())  # no push asked: nothing to say


@pytest.fixture
def client(monkeypatch):
    """huggingface_hub's settings as a child started with HF_HUB_OFFLINE=0, HF_ENDPOINT and HF_TOKEN would read."""
    from huggingface_hub import constants

    def set_(offline=False, endpoint="https://huggingface.co", token=None):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr("huggingface_hub.get_token", lambda: token)
    return set_


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case, words", [
    ("offline", ("push refused: HF_HUB_OFFLINE is set",)),
    ("unreachable", ("not reachable from here", "distclm export RUN --hub.repo_id=", "HF_HUB_OFFLINE=1")),
    ("no-token", ("no Hugging Face token", "HF_TOKEN", "`hf auth login`", "`huggingface-cli login`")),
])
def test_a_push_that_cannot_work_is_refused_at_once_naming_the_fix(client, tmp_path, case, words):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        if case == "offline":
            client(offline=True, token="hf_x")
        elif case == "unreachable":
            client(endpoint=f"http://127.0.0.1:{closed_port()}", token="hf_x")
        else:
            client(endpoint=f"http://127.0.0.1:{listener.getsockname()[1]}")
        t = time.monotonic()
        with pytest.raises(hub_push.PushFailed) as err:
            hub_push.push(tmp_path, cfg(**{"hub.repo_id": "someone/x"}).hub)
        assert time.monotonic() - t < 3.5
    finally:
        listener.close()
    assert all(w in str(err.value) for w in words), str(err.value)
    assert str(err.value).endswith(f"the export stays in {tmp_path}") and "\n" not in str(err.value)
