"""Fault injection from the test side: loaded at start-up by child processes whose PYTHONPATH has this folder
(tests.support.env.child_env(hooks={...})). Production code has no test hooks; this file patches it.

    DISTCLM_TEST_NAN_STEPS="3,4,5"       the training loss of these optimizer steps (1-based) becomes NaN
    DISTCLM_TEST_SIGTERM_AT_STEP="10"    rank 0 sends itself SIGTERM during that step (a preemption, exactly there)
    DISTCLM_TEST_SLOW_READS="1:0.2"      rank 1's block reads take 0.2 s longer (a slow disk on one node)
    DISTCLM_TEST_TOY_MOE="1"             the toy mixture of experts (tests/support/toy_moe.py) is a known model type
    DISTCLM_TEST_SLOW_FORWARD="1:0.2"    rank 1's forward of each micro-batch takes 0.2 s longer (a slow device);
                                         "all:0.2" on every rank
    DISTCLM_TEST_SIGSTOP_AT_STEP="1:10"  rank 1 stops itself (SIGSTOP, for good) at the start of that step
    DISTCLM_TEST_BLOCK_AT_STEP="1:10"    rank 1 blocks forever in a Python hook inside that step's backward
    DISTCLM_TEST_SLOW_EVAL="all:8"       every evaluation takes 8 s longer on these ranks (inside its phase)
    DISTCLM_TEST_SLOW_SAVE="0:8"         every checkpoint save takes 8 s longer on rank 0 (slow storage)
    DISTCLM_TEST_TEARDOWN_HANG="PATH"    the interpreter's teardown never ends (an object freed with this module
                                         sleeps in __del__); an atexit handler writes "atexit ran" to PATH first
    DISTCLM_TEST_FAKE_VERSION="1:torch=9.9.9"  rank 1 reports torch 9.9.9 to the start-up version check
    DISTCLM_TEST_RELEASE_HANG="1:5"      rank 1's release of its process group (distclm.dist.release) never returns,
                                         blocked in C while holding the GIL (as in ~ProcessGroupGloo's deadlock);
                                         the exit grace (dist.EXIT_GRACE_S) is 5 s
"""

import os
import signal

_nan_steps = {int(s) for s in os.environ.get("DISTCLM_TEST_NAN_STEPS", "").split(",") if s.strip()}
_sigterm_at = int(os.environ.get("DISTCLM_TEST_SIGTERM_AT_STEP", "0"))
_slow_rank, _, _slow_s = os.environ.get("DISTCLM_TEST_SLOW_READS", "").partition(":")

if _teardown := os.environ.get("DISTCLM_TEST_TEARDOWN_HANG"):
    import atexit
    import time

    class _HangsWhenFreed:
        def __del__(self, sleep=time.sleep):  # bound now: the time module may be gone when this runs
            sleep(3600)

    def _atexit_ran():
        with open(_teardown, "w") as f:
            f.write("atexit ran\n")

    _hangs = _HangsWhenFreed()
    atexit.register(_atexit_ran)

if os.environ.get("DISTCLM_TEST_TOY_MOE") == "1":
    from tests.support.toy_moe import register

    register()

if _slow_rank and os.environ.get("RANK") == _slow_rank:
    import time

    from distclm.data.blocks import SplitBlocks

    _batch = SplitBlocks.batch

    def batch(self, indices):
        time.sleep(float(_slow_s))
        return _batch(self, indices)

    SplitBlocks.batch = batch



def _on_this_rank(setting: str) -> str | None:
    """"R:VALUE" -> VALUE when this process is rank R (or R is "all"), else None."""
    who, _, value = os.environ.get(setting, "").partition(":")
    return value if who and who in ("all", os.environ.get("RANK", "0")) else None


_slow_forward = _on_this_rank("DISTCLM_TEST_SLOW_FORWARD")
_sigstop_at = int(_on_this_rank("DISTCLM_TEST_SIGSTOP_AT_STEP") or 0)
_block_at = int(_on_this_rank("DISTCLM_TEST_BLOCK_AT_STEP") or 0)

if _nan_steps or _sigterm_at or _slow_forward or _sigstop_at or _block_at:
    import time

    import distclm.loop as _loop

    _train_step, _forward_loss, _now = _loop.train_step, _loop.forward_loss, {"step": None}

    def train_step(engine, x, step, *args, **kwargs):
        _now["step"] = step
        if step == _sigterm_at and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), signal.SIGTERM)
        if step == _sigstop_at:
            os.kill(os.getpid(), signal.SIGSTOP)
        return _train_step(engine, x, step, *args, **kwargs)

    def forward_loss(*args, **kwargs):
        if _slow_forward:
            time.sleep(float(_slow_forward))
        loss = _forward_loss(*args, **kwargs)
        if _now["step"] == _block_at:
            loss.register_hook(blocked_in_a_backward_hook)  # runs inside this step's backward
        return loss * float("nan") if _now["step"] in _nan_steps else loss

    def blocked_in_a_backward_hook(grad):
        import threading

        threading.Event().wait()  # forever: a rank alive but stuck in Python

    _loop.train_step, _loop.forward_loss = train_step, forward_loss


_slow_eval, _slow_save = _on_this_rank("DISTCLM_TEST_SLOW_EVAL"), _on_this_rank("DISTCLM_TEST_SLOW_SAVE")

if _slow_eval or _slow_save:
    import time

    import distclm.evaluation as _evaluation
    import distclm.loop as _loop

    _evaluate_splits, _save_checkpoint = _evaluation.evaluate_splits, _loop.save_checkpoint

    def evaluate_splits(*args, **kwargs):
        time.sleep(float(_slow_eval or 0))
        return _evaluate_splits(*args, **kwargs)

    def save_checkpoint(*args, **kwargs):
        time.sleep(float(_slow_save or 0))
        return _save_checkpoint(*args, **kwargs)

    _evaluation.evaluate_splits, _loop.save_checkpoint = evaluate_splits, save_checkpoint


_fake_version = _on_this_rank("DISTCLM_TEST_FAKE_VERSION")

if _fake_version:
    import distclm.launch_checks as _launch_checks

    _package, _, _version = _fake_version.partition("=")
    _versions = _launch_checks.versions
    _launch_checks.versions = lambda: {**_versions(), _package: _version}


_release_hang = _on_this_rank("DISTCLM_TEST_RELEASE_HANG")

if _release_hang:
    import ctypes

    import distclm.dist as _dist

    _release = _dist.release

    def release(*args, **kwargs):
        _release(*args, **kwargs)
        blocked_in_c_holding_the_gil()

    def blocked_in_c_holding_the_gil():
        ctypes.PyDLL(None).sleep(3600)  # PyDLL: the GIL is kept across the call, so no Python thread runs either

    _dist.EXIT_GRACE_S, _dist.release = float(_release_hang), release
