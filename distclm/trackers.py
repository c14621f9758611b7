"""Experiment trackers: TensorBoard, MLflow, Weights & Biases through accelerate's tracker API (rank 0 only).

    --log.trackers=tensorboard,mlflow,wandb      (pip install 'distclm[trackers]')

Every record that goes to metrics.jsonl goes to the trackers too, as `train/<field>` and `eval/<field>` at its
step, with the same values; the resolved config is logged once as hyper-parameters, secrets redacted.

Where a run writes: TensorBoard into RUN/tensorboard/; MLflow into $MLFLOW_TRACKING_URI, else a file store in
RUN/mlruns (experiment "distclm", run named after the run dir); wandb into RUN/wandb, offline unless
WANDB_MODE says otherwise or WANDB_API_KEY is set (project $WANDB_PROJECT, else "distclm").

A resumed run continues the same tracker run (the same TensorBoard folder, MLflow run id and wandb run id,
kept in RUN/trackers.json). Steps between the checkpoint and a crash were logged before it: they are not
logged again (their values are the same, resume being exact); the next new step is.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
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


def values(record: dict) -> dict:
    """A metrics.jsonl record -> the tracker's scalars: `train/loss`, `eval/eval_perplexity`, ..."""
    skip = {"type", "step", "time"}
    return {f"{record['type']}/{k}": float(v) for k, v in record.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Trackers:
    """Rank 0's trackers; on other ranks (or with none asked for) every method does nothing."""

    def __init__(self, engine, names: list[str], run_dir: Path, config: dict):
        self.path, self.trackers = Path(run_dir) / STATE, []
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {"last": {}}
        if not names or not engine.is_main:
            return
        fresh = not self.state["last"]
        for name in names:
            tracker = engine.tracker(name, Path(run_dir), Path(run_dir).name, self.state)
            if fresh:
                tracker.store_init_configuration(hyperparameters(config))
            self.trackers.append(tracker)
        self._save()

    def log(self, record: dict) -> None:
        if not self.trackers or record["step"] <= self.state["last"].get(record["type"], 0):
            return  # logged before a crash: the same step, the same values
        for tracker in self.trackers:
            tracker.log(values(record), step=record["step"])
        self.state["last"][record["type"]] = record["step"]
        self._save()

    def _save(self) -> None:
        atomic_write(self.path, (json.dumps(self.state, indent=1) + "\n").encode())

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
