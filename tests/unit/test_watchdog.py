"""The hang rule (which ranks are missing, and when it is no hang), its one line, and the phase and wait bookkeeping
that the heartbeat and the step parts read: pure, no process group."""

from __future__ import annotations

import time

from distclm.activity import Activity, instrumented
from distclm.straggler import StepTimes
from distclm.watchdog import HANG_EXIT, describe, judge

NOW = 1000.0


def beat(rank, phase, step=10, waiting=False, phase_s=0.0, ago=0.5, host="node-a"):
    return {"rank": rank, "host": host, "pid": 100 + rank, "step": step, "phase": phase, "waiting": waiting,
            "phase_s": phase_s, "time": NOW - ago}


def test_a_silent_rank_that_others_wait_for_is_missing():
    beats = {0: beat(0, "all_reduce of gradients in backward", waiting=True, phase_s=25),
             1: beat(1, "backward", ago=30, host="node-b"), 2: beat(2, "all_reduce of gradients in backward",
                                                                    waiting=True, phase_s=24)}
    v = judge(beats, NOW, timeout=20, silent_s=5)
    assert [(m["rank"], m["silent"]) for m in v["missing"]] == [(1, True)]
    assert [w["rank"] for w in v["waiting"]] == [0, 2]  # longest first
    line = describe(v, "RUN")
    assert line == ("distclm: hang: not arrived: rank 1 on node-b (in backward at step 10, silent for 30 s: stopped "
                    "or dead); waiting for it: 2 ranks (longest: rank 0, 26 s in all_reduce of gradients in "
                    f"backward at step 10); stacks in RUN/hang-rank*.txt; exit {HANG_EXIT}")


def test_a_live_rank_at_another_phase_or_step_is_missing_and_a_never_seen_one_too():
    beats = {0: beat(0, "all_gather_into_tensor in forward", step=7, waiting=True, phase_s=30),
             1: beat(1, "backward", step=6, phase_s=31), 2: None}
    v = judge(beats, NOW, timeout=20, silent_s=5)
    assert [(m["rank"], m["silent"]) for m in v["missing"]] == [(1, False), (2, True)]
    assert "rank 1 on node-a (in backward at step 6, alive, 32 s in that phase)" in describe(v, "RUN")
    assert "rank 2 (never seen" in describe(v, "RUN")


def test_slowness_shared_by_all_is_no_hang():
    slow_step = {r: beat(r, "forward", phase_s=300) for r in range(3)}  # every rank 300 s in one forward
    assert judge(slow_step, NOW, 20, 5) is None
    everyone_in = {r: beat(r, "all_reduce in backward", waiting=True, phase_s=300) for r in range(3)}
    assert judge(everyone_in, NOW, 20, 5) is None  # all arrived: left to the backend's timeout
    short_wait = {0: beat(0, "barrier in checkpoint", waiting=True, phase_s=15), 1: beat(1, "checkpoint")}
    assert judge(short_wait, NOW, 20, 5) is None  # not yet the timeout
    saving = {0: beat(0, "checkpoint", phase_s=200), 1: beat(1, "barrier in checkpoint", waiting=True, phase_s=190)}
    assert judge(saving, NOW, 20, 5) is None  # rank 0 alive and writing: slow storage is not a hang
    saving[0]["time"] = NOW - 30  # ...unless it went silent
    assert [m["rank"] for m in judge(saving, NOW, 20, 5)["missing"]] == [0]


def test_phases_nest_and_waits_count_to_the_part_they_are_in():
    times = StepTimes()
    act = Activity(times)
    with act.phase("backward", "compute"):
        assert act.now[0] == "backward" and not act.waiting_now
        with act.waiting("all_reduce"):
            assert act.now[0] == "all_reduce in backward" and act.waiting_now
            with act.waiting("broadcast"):  # a collective inside a collective is timed once
                assert act.now[0] == "all_reduce in backward"
            time.sleep(0.05)
        act.open_wait("all_reduce of gradients")
        assert act.now[0] == "all_reduce of gradients in backward" and act.waiting_now
        time.sleep(0.05)
    assert act.now[0] == "setup" and act.part is None and not act.waiting_now
    with act.waiting("barrier"):  # outside a step part: not a step's wait
        time.sleep(0.02)
    assert 0.1 <= times.waits["compute"] < 0.5 and sum(times.waits.values()) == times.waits["compute"]


def test_instrumented_collectives_are_restored():
    import torch.distributed as td

    original = td.all_reduce
    with instrumented(Activity()):
        assert td.all_reduce is not original and td.all_reduce.__wrapped_collective__ is original
    assert td.all_reduce is original
