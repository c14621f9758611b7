"""A worker's exit code, passed on by the launcher: torchrun exits 1 whenever a worker fails, whatever the
worker's code, so a restart policy outside it (a Kubernetes Job's podFailurePolicy, a PyTorchJob's ExitCode policy)
would read every failure alike. launchers/torchrun.sh points DISTCLM_EXIT_DIR at a folder of its own and, when
torchrun fails, exits with the code the last attempt's workers wrote there instead:

    2    user error (do not retry)           75   a hang (distclm.watchdog.HANG_EXIT; retry)
    1    anything else

Files, per torchrun attempt N (TORCHELASTIC_RESTART_COUNT):

    attempt-N        created by every worker as it starts: the newest attempt is the one that failed last
    attempt-N.code   the cause, written once: the first writer wins. The failing worker writes before it exits,
                     and only then does torchrun stop its peers, whose own exits say nothing about the cause.

0, 130 and 143 (stopped by a signal: an operator, the launcher or a preemption) are never written; the script has
its own answer to a SIGTERM (143). A worker killed outright (SIGKILL, the OOM killer) writes nothing: torchrun's 1.
"""

from __future__ import annotations

import os

NOT_A_CAUSE = (0, 130, 143)


def of(exc: BaseException | None) -> int:
    """The code a command ends with while `exc` is in flight (None: it returned, 0), the way cli.main turns them
    into codes: a user error 2, Ctrl-C 130, an exception's own `exit_code` (a preemption's 143), anything else 1."""
    from distclm.errors import UserError

    if exc is None:
        return 0
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return getattr(exc, "exit_code", 2 if isinstance(exc, UserError) else 1)


def _attempt() -> str | None:
    folder = os.environ.get("DISTCLM_EXIT_DIR")
    if not folder or not os.path.isdir(folder):
        return None
    return os.path.join(folder, f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")


def started() -> None:
    """This worker's attempt has begun (a later attempt's cause replaces an earlier one's)."""
    if path := _attempt():
        open(path, "a").close()


def record(code: int) -> None:
    """Write `code` as this attempt's cause unless another worker did first or it is no cause; never raises."""
    path = _attempt()
    if path is None or code in NOT_A_CAUSE:
        return
    try:
        fd = os.open(f"{path}.code", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:  # another worker of this attempt wrote first
        return
    with os.fdopen(fd, "w") as f:
        f.write(f"{code}\n")
