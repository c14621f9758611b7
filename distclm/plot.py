"""RUN/curves.png: loss and tokens/s against step, from metrics.jsonl (the last record of a repeated step counts).
A mixture-of-experts run adds a third panel: the busiest expert's share of token-slots (max over layers; 1/E is
balanced, 1 a collapse onto one expert), the idle (layer, expert) pairs, and the routers' aux loss."""

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
    moe = [s for s in steps if train[s].get("experts")]
    fig = Figure(figsize=(15 if moe else 10, 3.6))
    ax1, ax2, *ax3 = fig.subplots(1, 3 if moe else 2)
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
    if moe:
        _experts(ax3[0], moe, train)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def _experts(ax, steps: list, train: dict) -> None:
    ax.plot(steps, [train[s]["experts"]["max_share"] for s in steps], label="busiest expert's share")
    aux = [(s, train[s]["aux_loss"]) for s in steps if train[s].get("aux_loss") is not None]
    if aux:
        ax.plot(*zip(*aux), label="aux loss")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    idle = ax.twinx()  # a count, on its own axis from 0
    idle.plot(steps, [train[s]["experts"]["idle"] for s in steps], "r:", label="idle (layer, expert) pairs")
    idle.set_ylim(bottom=0, top=max(1, *(train[s]["experts"]["idle"] for s in steps)) * 1.1)
    idle.set_ylabel("idle (layer, expert) pairs")
    lines = ax.get_legend_handles_labels(), idle.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], loc="center left")
