"""Experiment trackers: TensorBoard, MLflow, Weights & Biases through accelerate's tracker API (rank 0 only).

    --log.trackers=tensorboard,mlflow,wandb      (pip install 'distclm[trackers]')

Every record that goes to metrics.jsonl goes to the trackers too, as `train/<field>` and `eval/<field>` at its
step, with the same values; the resolved config is logged once as hyper-parameters, secrets redacted.

Where a run writes: TensorBoard into RUN/tensorboard/; MLflow into $MLFLOW_TRACKING_URI, else a file store in
RUN/mlruns (experiment "distclm", run named after the run dir); wandb into RUN/wandb, offline unless
WANDB_MODE says otherwise or WANDB_API_KEY is set (project $WANDB_PROJECT, else "distclm").

A resumed run continues the same tracker run (the same TensorBoard folder, MLflow run id and wandb run id,
kept in RUN/trackers.json). Steps that a crashed launch logged after its last checkpoint run again after
the resume: they are not logged twice (their values are the same, resume being exact), and a step the
crashed launch did not log is logged. wandb accepts only increasing steps: such a step (say step 5, after
the crashed launch had logged step 6) is dropped there, with wandb's warning; TensorBoard and MLflow take it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import uuid
from pathlib import Path

from distclm.atomic import atomic_write
from distclm.errors import UserError

KNOWN = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # tracker -> module it needs
STATE = "trackers.json"
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.I)


def parse_names(value: str | None) -> list[str]:
    """--log.trackers -> tracker names, each known and installed (else one line saying what to install)."""
    if not value or value == "none":
        return []
    names = [n.strip() for n in value.split(",") if n.strip()]
    for name in names:
        if name not in KNOWN:
            raise UserError(f"--log.trackers={value}: unknown tracker {name!r}; choose from {', '.join(KNOWN)}")
        if importlib.util.find_spec(KNOWN[name]) is None:
            raise UserError(f"--log.trackers={value}: {name} is not installed; pip install 'distclm[trackers]' "
                            f"(or pip install {KNOWN[name]})")
    return names


def secrets(env=None) -> list[str]:
    """Values of environment variables that hold credentials (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_..., ...)."""
    env = os.environ if env is None else env
    return [v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 6]


def hyperparameters(config: dict, env=None) -> dict:
    """The config flattened to `section.key`, scalars only, any secret value redacted."""
    hidden = secrets(env)
    out = {}
    for section, fields in config.items():
        for key, value in fields.items():
            value = "none" if value is None else value
            if isinstance(value, str):
                for secret in hidden:
                    value = value.replace(secret, "***")
            out[f"{section}.{key}"] = value
    return out


def values(record: dict, prefix: str | None = None) -> dict:
    """A metrics.jsonl record -> the tracker's scalars: `train/loss`, `eval/eval_perplexity`, and nested ones
    flattened (`train/step_parts/data/max`, `eval/eval_by_dir/<folder>/perplexity`)."""
    prefix = record["type"] if prefix is None else prefix
    out = {}
    for key, value in record.items():
        if key in ("type", "step", "time") and prefix == record.get("type"):
            continue
        if isinstance(value, dict):
            out.update(values({**value, "type": None}, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{key}"] = float(value)
    return out


def start_tracker(name: str, run_dir: Path, run_name: str, state: dict):
    """One of accelerate's trackers, started (rank 0). `state` (RUN/trackers.json) keeps its run id: a resumed
    run continues the same MLflow / wandb run; TensorBoard continues in the same folder."""
    from accelerate import tracking

    if name == "tensorboard":
        tracker = tracking.TensorBoardTracker("tensorboard", str(run_dir))
    elif name == "mlflow":
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a file store in the run dir (MLflow 3 wants it asked for)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            os.environ["MLFLOW_TRACKING_URI"] = (run_dir.resolve() / "mlruns").as_uri()
        tracker = tracking.MLflowTracker("distclm", run_id=state.get("mlflow_run_id"), run_name=run_name)
    else:
        if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
            os.environ["WANDB_MODE"] = "offline"  # no account needed; `wandb sync RUN/wandb/...` uploads later
        state.setdefault("wandb_id", uuid.uuid4().hex[:12])
        tracker = tracking.WandBTracker(os.environ.get("WANDB_PROJECT", "distclm"), dir=str(run_dir),
                                        id=state["wandb_id"], resume="allow", name=run_name)
    tracker.start()
    if name == "mlflow":
        state["mlflow_run_id"] = tracker.active_run.info.run_id
    return tracker


class Trackers:
    """Rank 0's trackers; on other ranks (or with none asked for) every method does nothing."""

    def __init__(self, engine, names: list[str], run_dir: Path, config: dict):
        self.path, self.trackers = Path(run_dir) / STATE, []
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {"logged": {}}
        if not names or not engine.is_main:
            return
        fresh = "started" not in self.state
        for name in names:
            tracker = start_tracker(name, Path(run_dir), Path(run_dir).name, self.state)
            if fresh:
                tracker.store_init_configuration(hyperparameters(config))
            self.trackers.append(tracker)
        self.state["started"] = True
        self._save()

    def log(self, record: dict) -> None:
        """A metrics.jsonl record, unless a crashed launch already logged its step (since its last checkpoint)."""
        logged = self.state["logged"].setdefault(record["type"], [])
        if not self.trackers or record["step"] in logged:
            return
        for tracker in self.trackers:
            tracker.log(values(record), step=record["step"])
        logged.append(record["step"])
        self._save()

    def checkpointed(self, step: int) -> None:
        """`step`: the oldest checkpoint kept. No resume runs a step up to it again, so their record can go (a
        resume from an older kept one, the newest being lost, runs again steps logged after it: not logged twice)."""
        if self.trackers:
            self.state["logged"] = {k: [s for s in v if s > step] for k, v in self.state["logged"].items()}
            self._save()

    def _save(self) -> None:
        atomic_write(self.path, (json.dumps(self.state, indent=1) + "\n").encode())

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
