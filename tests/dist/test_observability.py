"""What a user watches: experiment trackers that hold exactly what metrics.jsonl holds (through a SIGTERM and a
resume, secrets kept out), slow ranks named while training runs, and an eval bounded to the first N blocks."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.env import child_env
from tests.support.runs import read_metrics

SECRETS = {"HF_TOKEN": "hf_distclmTrackerSecret0123456789",
           "WANDB_API_KEY": "distclm0wandb0secret0key0that0is0forty0chars"}
ARGS = ("--model.name=gpt2-tiny", "--train.max_steps=10", "--train.save_every=4", "--train.micro_batch_size=4", "--train.lr=1e-3",
        "--log.every_steps=2", "--eval.every_steps=4", "--eval.max_blocks=5", "--eval.batch_size=5",
        "--log.trackers=tensorboard,mlflow,wandb", "--log.interval_s=1000")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, pydoc_blocks):
    """10 steps on 2 processes with all three trackers and a checkpoint every 4 steps, SIGTERM during step 6; the
    step-6 checkpoint is then removed (as if the crash had come before it), so the relaunch resumes from step 4
    and runs steps 5 and 6 again: step 6 was logged before, step 5 was not."""
    run = tmp_path_factory.mktemp("tracked") / "run"
    args = [f"--data.dir={pydoc_blocks}", f"--run.dir={run}", *ARGS]
    env = {**SECRETS, "WANDB_MODE": "offline"}
    stopped = run_cli("train", *args, nproc=2, env=child_env(hooks={"DISTCLM_TEST_SIGTERM_AT_STEP": "6"}, **env))
    assert re.search(r"exitcode\s*:\s*143", stopped.err), stopped.err[-3000:]
    shutil.rmtree(run / "checkpoints" / "step-6")
    resumed = run_cli("train", *args, nproc=2, env=child_env(**env), check=True)
    assert "resumed from" in resumed.out and "step-4" in resumed.out
    return run, stopped.out + resumed.out


def expected(run: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value, as metrics.jsonl holds it (the last record of a step counts)."""
    out = {}
    for kind in ("train", "eval"):
        for step, rec in read_metrics(run, kind).items():
            for key, value in rec.items():
                if key not in ("type", "step", "time") and isinstance(value, (int, float)) and \
                        not isinstance(value, bool):
                    out[(f"{kind}/{key}", step)] = float(value)
    return out


def test_tensorboard_holds_the_metrics_once_per_step(tracked):
    from tbparse import SummaryReader

    run, _ = tracked
    df = SummaryReader(str(run / "tensorboard")).scalars
    assert not df.duplicated(["tag", "step"]).any()  # steps 5-6 ran twice; step 6 is logged once
    got = {(r.tag, int(r.step)): r.value for r in df.itertuples()}
    want = expected(run)
    wanted = {k: v for k, v in want.items() if not k[0].endswith(("elapsed_s", "tokens_per_s", "per_device",
                                                                  "mem_bytes"))}  # these differ per launch
    assert {k for k in got if k[0].startswith(("train/loss", "eval/"))} == \
        {k for k in wanted if k[0].startswith(("train/loss", "eval/"))}
    assert [s for (tag, s) in sorted(got) if tag == "train/loss"] == [1, 2, 4, 5, 6, 8, 10]
    for key, value in wanted.items():
        assert abs(got[key] - value) <= 1e-6 * max(1.0, abs(value)), key  # TensorBoard stores float32


def test_mlflow_holds_the_metrics_and_the_config_in_one_run(tracked, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when asked to
    run, _ = tracked
    state = json.loads((run / "trackers.json").read_text())
    client = mlflow.tracking.MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("distclm").experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow_run_id"]]  # the resumed launch continued it
    params = runs[0].data.params
    assert params["train.lr"] == "0.001" and params["model.name"] == "gpt2-tiny" and params["log.trackers"]
    want = expected(run)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "eval/eval_loss", "eval/eval_perplexity"):
        history = client.get_metric_history(state["mlflow_run_id"], tag)
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), tag  # no step logged twice
        for m in history:
            assert abs(m.value - want[(tag, m.step)]) <= 1e-6 * max(1.0, abs(m.value)), (tag, m.step)


def test_wandb_runs_offline_as_one_run(tracked):
    run, _ = tracked
    state = json.loads((run / "trackers.json").read_text())
    assert [p.name.endswith(state["wandb_id"]) for p in (run / "wandb").glob("offline-run-*")] == [True, True]


def test_secrets_never_reach_a_tracker(tracked):
    run, console = tracked
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert all(secret.encode() not in data for secret in SECRETS.values()), path
    assert all(secret not in console for secret in SECRETS.values())


def test_an_undisturbed_run_names_no_slow_rank_and_logs_the_step_parts(tracked):
    run, console = tracked
    assert "is slow" not in console
    parts = read_metrics(run)[10]["step_parts"]
    assert set(parts) == {"data", "compute", "optimizer", "comm", "wait"}
    assert all(p["max"] >= p["median"] >= 0 and p["max_rank"] in (0, 1) for p in parts.values())


def test_a_rank_with_slow_reads_is_named_while_training_runs(tmp_path, pydoc_blocks):
    run = tmp_path / "slow"
    # llama-tiny (a buffer: RoPE's inv_freq) and ONE eval block: rank 1 has none. DDP's first forward after training
    # broadcasts buffers, so an eval through DDP hung here (rank 1 never joined); eval runs on the bare module.
    result = run_cli("train", f"--data.dir={pydoc_blocks}", f"--run.dir={run}", "--model.name=llama-tiny",
                     "--train.max_steps=20", "--train.micro_batch_size=4", "--log.every_steps=2",
                     "--log.interval_s=0", "--eval.max_blocks=1", nproc=2, check=True,
                     env=child_env(hooks={"DISTCLM_TEST_SLOW_READS": "1:0.3"}))
    lines = result.out.splitlines()
    named = [i for i, line in enumerate(lines) if re.match(r"rank 1 \(\S+\) is slow: data wait 0\.\d\d s/step, "
                                                           r"median 0\.\d\d s$", line)]
    assert named, result.out[-3000:]
    steps = [(i, int(m.group(1))) for i, line in enumerate(lines) if (m := re.match(r"step (\d+)/20 ", line))]
    before = [step for i, step in steps if i < named[0]]
    # Logged every 2 steps, named after 3 slow intervals in a row: at step 6, while training still runs (a step
    # line follows), and not only by an end-of-run report.
    assert before and before[-1] <= 10, before
    assert any(i > named[0] for i, _ in steps), "named only after the last step"
    assert read_metrics(run)[6]["step_parts"]["data"]["max_rank"] == 1
    assert read_metrics(run)[6]["step_parts"]["data"]["max"] >= 0.3


def test_a_tracker_that_is_not_installed_is_one_line(cli, pydoc_blocks, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    line = cli("train", f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", f"--run.dir={tmp_path / 'r'}",
               "--log.trackers=tensorboard,wandb").error_line()
    assert "wandb is not installed; pip install 'distclm[trackers]'" in line
    assert not (tmp_path / "r").exists()


def test_eval_max_blocks_covers_the_first_n_blocks_on_any_world_size(tracked, cli, pydoc_blocks):
    run, _ = tracked
    last = read_metrics(run, "eval")[10]
    assert (last["eval_blocks"], last["eval_tokens"]) == (5, 5 * 63)
    r = cli("eval", f"--model.name={run}", f"--data.dir={pydoc_blocks}", "--eval.max_blocks=5",
            "--eval.batch_size=2")  # 1 process here, 2 in training; other batch size
    assert r.code == 0 and "5 blocks (--eval.max_blocks)" in r.out
    assert abs(float(r.out.split("perplexity: ")[1].split()[0]) / last["eval_perplexity"] - 1) < 1e-6


def test_eval_at_end_false_skips_the_forced_final_eval(cli, pydoc_blocks, tmp_path):
    run = tmp_path / "run"
    assert cli("train", f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", f"--run.dir={run}",
               "--train.max_steps=2", "--train.micro_batch_size=2", "--eval.at_end=false").code == 0
    assert read_metrics(run, "eval") == {} and (run / "export" / "model.safetensors").exists()
