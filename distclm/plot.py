"""RUN/curves.png: loss and tokens/s against step, from metrics.jsonl (the last record of a repeated step counts)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics_path: Path, out: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state, faster import

    train, evals = {}, {}
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        (train if r["type"] == "train" else evals)[r["step"]] = r
    steps = sorted(train)
    fig = Figure(figsize=(10, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(steps, [train[s]["loss"] for s in steps], label="train loss")
    if evals:
        es = sorted(evals)
        ax1.plot(es, [evals[s]["eval_loss"] for s in es], "o-", label="eval loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    tps = [(s, train[s]["tokens_per_s"]) for s in steps if train[s]["tokens_per_s"]]
    if tps:
        ax2.plot(*zip(*tps))
    ax2.set_xlabel("step")
    ax2.set_ylabel("tokens/s (global)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
