"""One global batch on any number of processes: a run stopped on 2 processes continues on 1, then on 4, with
the same blocks at every step and the same weights as a run that never stopped (dropout on).

Global batch 8, micro-batch 2, a GPT-2 with dropout 0.1, 20 steps, lr 1e-3:
  A   2 processes (accumulation 2), straight
  B   2 processes, SIGTERM during step 8 -> 1 process (accumulation 4), SIGTERM during step 14
      -> 4 processes (accumulation 1) to the end
"""

from __future__ import annotations

import re

import pytest

from tests.support.cli import run_cli
from tests.support.env import child_env
from tests.support.runs import global_order, read_metrics, train, weights

ARGS = ("--train.global_batch_size=8", "--train.micro_batch_size=2", "--train.max_steps=20", "--train.lr=1e-3",
        "--train.warmup_steps=2", "--train.seed=3", "--log.block_ids=true", "--eval.max_blocks=8")


@pytest.mark.parametrize("strategy, atol", [("ddp", 1e-5), pytest.param("zero2", 1e-4, marks=pytest.mark.extended)])
def test_stop_on_2_continue_on_1_then_4_matches_a_straight_run(tmp_path, pydoc_blocks, dropout_gpt2, strategy, atol):
    args = [*ARGS, f"--train.strategy={strategy}"]
    train(2, tmp_path / "a", pydoc_blocks, *args, model=str(dropout_gpt2))
    b = [f"--data.dir={pydoc_blocks}", f"--model.name={dropout_gpt2}", f"--run.dir={tmp_path / 'b'}",
         "--log.every_steps=1", *args]
    for nproc, stop in ((2, 8), (1, 14)):
        r = run_cli("train", *b, nproc=nproc, env=child_env(hooks={"DISTCLM_TEST_SIGTERM_AT_STEP": str(stop)}))
        assert r.code == 143 or re.search(r"exitcode\s*:\s*143", r.err), r.err[-3000:]
        assert f"SIGTERM: saved a checkpoint at step {stop}" in r.err
    last = run_cli("train", *b, nproc=4, check=True)
    assert "written by 1 process(es), now 4" in last.out
    assert global_order(tmp_path / "b", micro=2) == global_order(tmp_path / "a", micro=2)  # step by step
    la, lb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert max(abs(la[s]["loss"] - lb[s]["loss"]) for s in range(1, 21)) <= atol
    wa, wb = weights(tmp_path / "a" / "export"), weights(tmp_path / "b" / "export")
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"{strategy}: 2 -> 1 -> 4 processes, max |weight diff| {diff:.3g}")
    assert wa.keys() == wb.keys() and diff <= atol


def test_a_world_size_that_does_not_divide_the_global_batch_is_one_line(cli, pydoc_blocks, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    line = cli("train", f"--data.dir={pydoc_blocks}", "--model.name=gpt2-tiny", f"--run.dir={tmp_path / 'r'}",
               "--train.global_batch_size=8", "--train.micro_batch_size=2").error_line()
    assert line.endswith("world sizes that divide it: 1, 2, 4")
