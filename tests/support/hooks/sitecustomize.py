"""Fault injection from the test side: loaded at start-up by child processes whose PYTHONPATH has this folder
(tests.support.env.child_env(hooks={...})). Production code has no test hooks; this file patches it.

    DISTCLM_TEST_NAN_STEPS="3,4,5"    the training loss of these optimizer steps (1-based) becomes NaN
"""

import os

_nan_steps = {int(s) for s in os.environ.get("DISTCLM_TEST_NAN_STEPS", "").split(",") if s.strip()}

if _nan_steps:
    import distclm.loop as _loop

    _train_step, _forward_loss, _now = _loop.train_step, _loop.forward_loss, {"step": None}

    def train_step(engine, x, step, *args, **kwargs):
        _now["step"] = step
        return _train_step(engine, x, step, *args, **kwargs)

    def forward_loss(*args, **kwargs):
        loss = _forward_loss(*args, **kwargs)
        return loss * float("nan") if _now["step"] in _nan_steps else loss

    _loop.train_step, _loop.forward_loss = train_step, forward_loss
