"""Pushing an export to the Hub, and the model card in every export, with the real huggingface_hub client.

The Hub cannot be reached from here: the pushes go to tests/support/hub_standin.py, a stand-in on 127.0.0.1 that
implements what create_repo + create_branch + upload_folder call (git + LFS basic transfer: HF_HUB_DISABLE_XET=1)
and records the repo creation and each commit's files. The refusals run against the real client with no
stand-in: offline mode, an endpoint nobody answers, no token, and the stand-in answering 401.

One LoRA run (1 process, 4 steps) trains under a fake $HOME with secrets in its environment and pushes at its end;
the other tests export it again (to --out folders) and push those.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distclm.ownership import MARKER
from tests.support.cli import run_cli
from tests.support.env import REPO, child_env
from tests.support.hub_standin import HubStandIn
from tests.support.runs import read_metrics

# Each test starts distclm export (and the fixture a training run): about 2.5 minutes in all, so `make test` only.
pytestmark = pytest.mark.slow

SECRETS = {"WANDB_API_KEY": "wandb0123456789abcdefSECRET", "MY_SERVICE_PASSWORD": "pw-9f8e7d6c5b4a",
           "UNNAMED_VALUE": "hf_LooksLikeAToken0123456789abcd"}  # a token by its shape, whatever its name
TRAIN = ("--model.name=gpt2-tiny", "--lora.r=4", "--train.max_steps=4", "--train.micro_batch_size=4",
         "--train.lr=1e-3", "--eval.max_blocks=8", "--eval.every_steps=2", "--log.every_steps=1")


def hub_env(hub: HubStandIn | None, home: Path, **extra) -> dict:
    """A child's environment that pushes to `hub` (None: the real default endpoint) from a fake $HOME, with
    secrets set; the client's xet transfer off (the stand-in speaks git + LFS only)."""
    env = child_env(HOME=str(home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                    HF_HUB_DISABLE_PROGRESS_BARS="1", **SECRETS)
    env.pop("HF_TOKEN", None)
    if hub is not None:
        env.update(HF_ENDPOINT=hub.url, HF_TOKEN=hub.token)
    env.update(extra)
    return env


def files_of(folder: Path, skip: str | None = None) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (not under `skip`/), but the ownership marker: it says
    who wrote the folder on this machine, and the push leaves it out."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER
            and not (skip and p.relative_to(folder).parts[0] == skip)}


def pushed(commit: dict) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest() for path, data in commit["files"].items()}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fake-home")


@pytest.fixture(scope="module")
def trained(home, pydoc_blocks):
    """A LoRA run in $HOME/runs/lora that pushed its export at the end of training -> (run dir, stand-in, result)."""
    run = home / "runs" / "lora"
    with HubStandIn() as hub:
        result = run_cli("train", f"--data.dir={pydoc_blocks}", f"--run.dir={run}", *TRAIN, "--train.push_to_hub=true",
                         "--hub.repo_id=someone/tiny-lora", env=hub_env(hub, home), check=True)
    return run, hub, result


def test_training_pushes_its_merged_export_at_the_end(trained):
    run, hub, result = trained
    assert hub.repos == [{"name": "tiny-lora", "organization": "someone", "visibility": "public", "type": "model"}]
    (commit,) = hub.commits
    export = run / "export"
    # every file of the export, bytes identical, the card included; the merged model only (its adapter/ is what
    # --hub.adapter_only pushes); the weights as LFS, as the Hub stores them
    assert pushed(commit) == files_of(export, skip="adapter")
    assert (export / MARKER).is_file() and MARKER not in commit["files"]  # the ownership marker stays home
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(commit["files"])
    assert commit["lfs"] == ["model.safetensors"]
    assert not [p for p in commit["files"] if "checkpoint" in p or "optimizer" in p or p.endswith((".pt", ".bin"))]
    assert commit["revision"] == "main" and commit["summary"] == "distclm export at step 4"
    assert "pushed " in result.out and "someone/tiny-lora" in result.out
    assert hub.token not in result.out + result.err


def test_export_pushes_private_to_a_branch_with_its_message(trained, home, tmp_path):
    run, _, _ = trained
    out = tmp_path / "export-v1"
    with HubStandIn() as hub:
        result = run_cli("export", run, "--out", out, "--hub.repo_id=someone/tiny-v1", "--hub.private=true",
                         "--hub.revision=v1", "--hub.commit_message=first release", env=hub_env(hub, home),
                         check=True)
    assert hub.repos == [{"name": "tiny-v1", "organization": "someone", "visibility": "private", "type": "model"}]
    assert hub.branches == [("someone/tiny-v1", "v1")]
    (commit,) = hub.commits
    assert (commit["revision"], commit["summary"]) == ("v1", "first release")
    assert pushed(commit) == files_of(out, skip="adapter") and "README.md" in commit["files"]
    assert f"pushed {out} to someone/tiny-v1" in result.out


def test_adapter_only_pushes_the_adapter_and_its_card(trained, home, tmp_path):
    run, _, _ = trained
    out = tmp_path / "export-adapter"
    with HubStandIn() as hub:
        run_cli("export", run, "--out", out, "--hub.repo_id=someone/tiny-adapter", "--hub.adapter_only=true",
                env=hub_env(hub, home), check=True)
    (commit,) = hub.commits
    assert pushed(commit) == files_of(out / "adapter")
    assert set(commit["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert commit["summary"] == "distclm export at step 4 (LoRA adapter)"
    assert json.loads(commit["files"]["adapter_config.json"])["r"] == 4


def test_training_on_2_processes_pushes_once_from_rank_0(shared, home, tmp_path, pydoc_blocks):
    from tests.support.runs import SHARED

    run = tmp_path / "ddp"
    shutil.copytree(shared.get("launch-torchrun-ddp"), run)
    nproc, args = SHARED["launch-torchrun-ddp"]
    with HubStandIn() as hub:  # the run is complete: training exports again, then rank 0 alone pushes
        run_cli("train", f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", f"--run.dir={run}", *args,
                "--train.push_to_hub=true", "--hub.repo_id=someone/ddp", nproc=nproc, env=hub_env(hub, home),
                check=True)
    assert len(hub.repos) == 1 and len(hub.commits) == 1
    assert pushed(hub.commits[0]) == files_of(run / "export")
    card = hub.commits[0]["files"]["README.md"].decode()
    assert "- strategy: ddp; world size 2 (1 node(s) x 2), launched by torchrun" in card, card[card.find("## Training setup"):][:300]
    assert "python -m torch.distributed.run --nproc_per_node 2 " in card and " -m distclm.cli train --data.dir=" in card


def test_hub_settings_without_a_repo_id_are_one_line(shared, home, tmp_path):
    run = shared.get("equiv-1proc")
    line = run_cli("export", run, "--out", tmp_path / "e", "--hub.private=true", env=hub_env(None, home)).error_line()
    assert "--hub.repo_id=USER/NAME" in line


def test_adapter_only_without_an_adapter_is_one_line(shared, home, tmp_path):
    run = shared.get("equiv-1proc")
    with HubStandIn() as hub:
        line = run_cli("export", run, "--out", tmp_path / "e", "--hub.repo_id=someone/x", "--hub.adapter_only=true",
                       env=hub_env(hub, home)).error_line()
    assert "no adapter/" in line and "--lora.r=0" in line and not hub.commits


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REFUSALS = {  # name -> (environment beyond hub_env(None, home), words the line must hold)
    "offline": ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_standinTOKEN0123456789abcdef"}, ("HF_HUB_OFFLINE",)),
    "unreachable": ({"HF_ENDPOINT": "http://127.0.0.1:{port}", "HF_TOKEN": "hf_standinTOKEN0123456789abcdef"},
                    ("not reachable", "HF_HUB_OFFLINE")),
    "no-token": ({"HF_ENDPOINT": "{hub}"}, ("no Hugging Face token", "HF_TOKEN", "hf auth login",
                                             "huggingface-cli login")),
    "unauthorized": ({"HF_ENDPOINT": "{hub}", "HF_TOKEN": "hf_standinTOKEN0123456789abcdef"},
                     ("HTTP 401", "HF_TOKEN", "hf auth login")),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_push_that_cannot_work_is_one_line_in_seconds_and_the_export_stays(case, trained, home, tmp_path):
    run, _, _ = trained
    extra, words = REFUSALS[case]
    out = tmp_path / "export"
    with HubStandIn(unauthorized=case == "unauthorized") as hub:
        env = hub_env(None, home, **{k: v.format(port=closed_port(), hub=hub.url) for k, v in extra.items()})
        line = run_cli("export", run, "--out", out, "--hub.repo_id=someone/tiny", env=env).error_line()
        timed = timed_push(out, env)
    assert all(w in line for w in words), line
    assert f"the export stays in {out}" in line and "hf_standin" not in line
    assert files_of(out) == files_of(run / "export")  # the export is complete on disk
    assert timed["error"] == line.removeprefix("distclm: error: ")
    assert timed["seconds"] < 5.0, timed  # the client alone retries for minutes; one probe decides in 3 s at most
    assert not hub.commits


def timed_push(folder: Path, env: dict) -> dict:
    """hub_push.push on `folder` in a child with `env`, timed there (what the refusal costs, start-up aside)."""
    code = ("import json, sys, time\n"
            "from distclm.config.tree import HubConfig\nfrom distclm.errors import UserError\n"
            "from distclm.hub_push import push\n"
            "t = time.monotonic()\n"
            "try:\n    push(sys.argv[1], HubConfig(repo_id='someone/tiny')); err = None\n"
            "except UserError as exc:\n    err = str(exc)\n"
            "print(json.dumps({'seconds': time.monotonic() - t, 'error': err}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_failed_push_after_training_warns_and_training_exits_0(trained, home, tmp_path, pydoc_blocks):
    run, _, _ = trained
    again = home / "runs" / "lora-again"
    shutil.copytree(run, again)
    before = {k: v for k, v in files_of(again / "export").items() if not k.endswith("README.md")}
    env = hub_env(None, home, HF_HUB_OFFLINE="1")
    t = time.monotonic()
    result = run_cli("train", f"--data.dir={pydoc_blocks}", f"--run.dir={again}", *TRAIN, "--train.push_to_hub=true",
                     "--hub.repo_id=someone/tiny-lora", env=env)
    assert result.code == 0, result.err
    # warned before training starts, and after it, with the command that pushes later
    at_start, at_end = [line for line in result.err.splitlines() if line.startswith("distclm: warning:")]
    assert at_start.startswith("distclm: warning: --train.push_to_hub=true: push refused: HF_HUB_OFFLINE is set")
    assert "HF_HUB_OFFLINE" in at_end and f"distclm export {again} --hub.repo_id=someone/tiny-lora" in at_end
    # the export as it was (its card is written again, naming this launch's command)
    assert {k: v for k, v in files_of(again / "export").items() if not k.endswith("README.md")} == before
    assert (again / "export" / "README.md").exists()
    assert time.monotonic() - t < 120
    assert read_metrics(again, "eval")  # the run's results untouched


# ---------------------------------------------------------------------------------------------
# The card


def test_the_card_parses_and_holds_data_hyperparameters_results_setup_and_command(trained, home, pydoc_blocks):
    from huggingface_hub import ModelCard

    run, _, _ = trained
    text = (run / "export" / "README.md").read_text()
    card = ModelCard.load(run / "export" / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "distclm" and meta["pipeline_tag"] == "text-generation"
    assert {"distclm", "lora"} <= set(meta["tags"]) and "base_model" not in meta  # a preset: no hub base
    manifest = json.loads((pydoc_blocks / "manifest.json").read_text())
    for split in ("train", "validation"):
        s = manifest["splits"][split]
        assert f"| {split} | {s['n_docs']} | {s['n_tokens']} | {s['n_blocks']} |" in text
    assert "- format: text; template: none (plain text" in text and "64-token blocks" in text
    evals = read_metrics(run, "eval")
    assert sorted(evals) == [2, 4]
    for step, rec in evals.items():  # every eval, its numbers as metrics.jsonl has them
        assert f"| {step} | {rec['epoch']:.4f} | {rec['eval_loss']:.4f} | {rec['eval_perplexity']:.4f} | " \
               f"{rec['eval_tokens']} | {rec['eval_blocks']} |" in text
    assert "  lr: 0.001\n" in text and "  r: 4\n" in text and "  max_steps: 4\n" in text  # as resolved
    assert "- strategy: ddp; world size 1" in text and "- hardware: CPU" in text
    assert "torch 2." in text and "transformers " in text and "peft " in text
    assert "distclm train --data.dir=" in text and "--run.dir=~/runs/lora" in text and "--lora.r=4" in text


def test_the_card_holds_no_secret_and_no_home_path(trained, home):
    run, hub, _ = trained
    for card in (run / "export" / "README.md", run / "export" / "adapter" / "README.md"):
        text = card.read_text()
        assert str(home) not in text and "~/runs/lora" in text
        for secret in (hub.token, *SECRETS.values()):
            assert secret not in text, card
    assert str(home) not in json.dumps(hub.commits[0]["files"]["README.md"].decode())


def test_every_export_has_a_card_also_out_and_not_lora(shared, tmp_path):
    from huggingface_hub import ModelCard

    run = shared.get("equiv-1proc")
    out = tmp_path / "again"
    run_cli("export", run, "--out", out, check=True)
    for folder in (run / "export", out):
        meta = ModelCard.load(folder / "README.md").data.to_dict()
        assert meta["library_name"] == "distclm" and "lora" not in meta["tags"]
    text = (out / "README.md").read_text()
    last = read_metrics(run, "eval")[6]
    assert "| 6 | " in text and f"{last['eval_perplexity']:.4f}" in text and "This folder holds the model." in text

