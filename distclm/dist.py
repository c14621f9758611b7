"""Rank and world from the launcher's environment, the one way the process group forms (and why it did not),
and helpers that work with or without a process group.

torchrun, the deepspeed launcher, accelerate and Slurm-through-torchrun all set RANK, WORLD_SIZE,
LOCAL_RANK (and LOCAL_WORLD_SIZE). With none set this is one process: rank 0 of 1. Nothing here
imports torch at module level, so data code can ask "am I rank 0?" cheaply.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, Mapping, NoReturn

from distclm.errors import UserError, first_line


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))


def is_rank0() -> bool:
    return rank() == 0


def _pg():
    """The default process group's torch.distributed, or None when there is none."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as td

    return td if td.is_available() and td.is_initialized() else None


def group_rank_and_size() -> tuple[int, int] | None:
    """(rank, world size) as the process group sees them; None when there is no process group."""
    td = _pg()
    return (td.get_rank(), td.get_world_size()) if td is not None else None


def device():
    """This rank's device: its local GPU (LOCAL_RANK), else the CPU."""
    import torch

    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    td = _pg()
    if td is not None:
        td.barrier()


def all_reduce_sum(values):
    """Sum a float64 tensor across ranks in place (no-op on one process); returns it."""
    td = _pg()
    if td is not None and td.get_world_size() > 1:
        td.all_reduce(values, op=td.ReduceOp.SUM)
    return values


def broadcast_object(obj):
    """Rank 0's `obj` (any picklable value) on every rank; `obj` itself with no process group."""
    td = _pg()
    if td is None or td.get_world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (`[obj]` with no process group)."""
    td = _pg()
    if td is None or td.get_world_size() == 1:
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


# Set once this process sets out to form a process group: end_process then skips the interpreter's teardown.
_formed = False
# Set by the process's own entry point (cli.entry, the probe): it ends through end_process, so a grace may end it.
# Not set when main() runs inside another program (the tests' in-process calls): that program owns its exit.
_owned = False
# What still holds a destroyed process group (the DDP Reducer, DeepSpeed's engine): kept until os._exit, never freed.
_held = None
EXIT_GRACE_S = 60.0  # from the moment a rank's work is done to its exit, at most (plus the stacks' print)


def own_process() -> None:
    """This process is a distclm rank's own (cli.entry, the probe): past a grace, arm_grace may end it."""
    global _owned
    _owned = True


def release(hold=None, wait: bool = True) -> None:
    """The process group released in an order that cannot deadlock (the teardown deadlock in DESIGN.md):

    1. `wait`: the device synchronised and a barrier, so every collective of this rank has completed on every rank;
    2. destroy_process_group: the group is unregistered and its backends shut down, explicitly;
    3. what still holds the group (`hold`: the Engine, through it DDP's Reducer or DeepSpeed's engine) is kept until
       the process ends with os._exit, never freed. Freeing the last reference runs ~ProcessGroupGloo, which joins
       gloo's worker threads while the freeing thread holds the GIL; a worker still destroying a finished work
       (AsyncAllgatherWork of a barrier) waits for the GIL to drop a tensor: neither moves again. gloo's backend
       has no shutdown of its own that would join them first (c10d Backend::shutdown is a no-op for it).
    """
    global _held
    if hold is not None:
        _held = hold  # the previous one's threads are long idle: replacing it frees it safely
    td = _pg()
    if td is None:
        return
    try:
        if wait:
            import torch

            if torch.cuda.is_initialized():  # kernels still queued (an NCCL collective among them) finish first
                torch.cuda.synchronize()
            td.barrier()
    finally:
        td.destroy_process_group()


def work_done(code: int, hold=None) -> None:
    """A rank's work is done (train's, eval's, generate's, the probe's `finally`): the group is released under the
    grace, so a release that blocks ends the process with `code`, the run's own, and every stack printed."""
    with grace(code):
        release(hold)


@contextmanager
def grace(code: int, seconds: float | None = None) -> Iterator[None]:
    """The block ends within `seconds` (EXIT_GRACE_S): past it, every thread's stack on stderr, and exit `code`."""
    arm_grace(code, seconds)
    try:
        yield
    finally:
        disarm_grace()


_timer = None  # the armed POSIX timer (a ctypes timer_t)


def arm_grace(code: int, seconds: float | None = None) -> None:
    """From now on this process ends within `seconds`, whatever its threads do. At the deadline faulthandler prints
    every thread's stack and, a second later, a POSIX timer's thread calls _exit(code). Both run outside Python:
    the main thread may hold the GIL in a C++ destructor forever (as in the teardown deadlock), where a Python timer
    thread would wait for the GIL too. Where the C library has no such timer, faulthandler exits, with 1. Output is
    flushed now: _exit flushes nothing. Only in a process of distclm's own (own_process); re-arming replaces."""
    import faulthandler

    global _timer
    if not _owned:
        return
    disarm_grace()
    seconds = EXIT_GRACE_S if seconds is None else seconds
    _flush()
    _timer = _exit_timer(seconds + 1.0, code)
    faulthandler.dump_traceback_later(seconds, exit=_timer is None, file=2)  # fd 2: whatever wraps sys.stderr


def disarm_grace() -> None:
    import faulthandler
    global _timer
    faulthandler.cancel_dump_traceback_later()
    if _timer is not None:
        import ctypes

        ctypes.CDLL(None).timer_delete(_timer)
        _timer = None


def _exit_timer(seconds: float, code: int):
    """A POSIX timer (CLOCK_MONOTONIC, SIGEV_THREAD) whose expiry calls _exit(code) (its one `union sigval` argument
    is passed as an int) on a C library thread -> its timer_t; None where it cannot be set (not Linux)."""
    import ctypes

    class TimeSpec(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]

    class ITimerSpec(ctypes.Structure):
        _fields_ = [("interval", TimeSpec), ("value", TimeSpec)]

    class SigEvent(ctypes.Structure):  # struct sigevent on Linux: value, signo, notify, then the thread's function
        _fields_ = [("value", ctypes.c_void_p), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                    ("function", ctypes.c_void_p), ("attribute", ctypes.c_void_p), ("pad", ctypes.c_int * 8)]

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        event = SigEvent(value=code & 0xFF, notify=2,  # SIGEV_THREAD
                         function=ctypes.cast(libc._exit, ctypes.c_void_p).value)
        timer = ctypes.c_void_p()
        if libc.timer_create(1, ctypes.byref(event), ctypes.byref(timer)) != 0:  # CLOCK_MONOTONIC
            return None
        whole = int(seconds)
        spec = ITimerSpec(value=TimeSpec(whole, int((seconds - whole) * 1e9)))
        if libc.timer_settime(timer, 0, ctypes.byref(spec), None) != 0:
            libc.timer_delete(timer)
            return None
        return timer
    except (OSError, AttributeError):  # no such symbol in this C library
        return None


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that left, a closed stream: nothing more can be said there
            pass


def end_process(code: int) -> NoReturn:
    """How a `distclm` process ends (cli.entry). One that formed a process group does what a normal exit does
    first (waits for its non-daemon threads, runs the atexit handlers, flushes stdout and stderr), then leaves with
    os._exit and skips the interpreter's teardown: there torch's C++ threads race the interpreter for the GIL
    (pytorch/pytorch#190489), a rare abort or a rank that has printed its last line and never exits, so a pod is
    never restarted. A group still formed (doctor's) is released first. All of it under the grace (arm_grace): past
    EXIT_GRACE_S, every thread's stack and exit `code`. Without a group this is sys.exit."""
    if not _formed:
        sys.exit(code)
    import atexit
    import threading

    own_process()
    arm_grace(code)
    release(wait=False)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    _flush()
    os._exit(code)


def free_port() -> int:
    """A TCP port nobody listens on now (for a 1-node rendezvous on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launch_env() -> None:
    """One process started without a launcher: the environment a 1-process group needs."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def pick_backend(t) -> str:
    """--train.backend resolved: nccl on GPUs, gloo on CPU."""
    import torch

    if t.backend == "nccl" and not torch.cuda.is_available():
        raise UserError("--train.backend=nccl needs CUDA GPUs and none is visible here; use --train.backend=gloo "
                        "(or auto) on CPU")
    if t.backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return t.backend


def pick_precision(t, training: bool = True) -> str:
    """'no' | 'bf16' | 'fp16' in accelerate's words. For eval, auto means fp32: a perplexity should not
    depend on the card."""
    import torch

    p = t.precision
    if p in ("bf16", "fp16") and not torch.cuda.is_available():
        raise UserError(f"--train.precision={p} needs a GPU here; use fp32 (or auto) on CPU")
    if p == "auto":
        return "bf16" if training and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no"}.get(p, p)


def return_freed_memory() -> None:
    """ZeRO-3: large host allocations (> 256 KiB) are mmapped and go back to the OS when freed.

    glibc raises its mmap threshold to the size of every large block freed (up to 32 MiB), after which ZeRO-3's
    per-layer gathers, gradient buckets and activations are carved from arenas that keep their memory: measured
    here on a 124 M-parameter GPT-2 on 2 CPU ranks, 0.8 GiB per rank stayed resident after the first steps
    (2.39 GiB, 1.61 after malloc_trim). A fixed threshold keeps RSS at what the tensors hold (1.60 GiB). It costs
    page faults: a 1-process DDP step of gpt2-tiny took ~10% longer with it, so only ZeRO-3 (chosen for memory)
    sets it.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def form_process_group(t, store=None, needed: bool = False) -> None:
    """The one way distclm forms its process group (train, eval, generate, doctor).

    Under torchrun's agent the store is prefixed by the restart count: the agent keeps ONE TCPStore
    across restart rounds, so a restarted gloo group could otherwise read a dead round's addresses
    ("connectFullMesh ... Connection refused", seen here in 1 of 4 restarts). `store`: one the caller
    already holds (doctor's check-in store). A rendezvous or backend that cannot be reached within
    --train.dist_timeout_s becomes one line naming MASTER_ADDR:MASTER_PORT.
    """
    global _formed
    import torch
    import torch.distributed as td

    if td.is_initialized() or (world_size() == 1 and not needed):
        return
    ensure_launch_env()  # one process, no launcher: DeepSpeed still wants a (1-process) group
    backend, timeout = pick_backend(t), timedelta(seconds=t.dist_timeout_s)
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    _formed = True  # from here on, even if the rendezvous fails: its threads may be left behind
    with explain_init_errors(t.dist_timeout_s):
        if store is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            agent = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(),
                                is_master=False, timeout=timeout)
            store = td.PrefixStore(f"distclm/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)
        if store is None:
            td.init_process_group(backend, init_method="env://", timeout=timeout)
        else:
            td.init_process_group(backend, store=store, rank=rank(), world_size=world_size(),
                                  timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Reaching the rendezvous and the backend


_BACKEND_ERROR = re.compile(r"gloo|nccl|connect|timed? ?out|socket|store|rendezvous", re.I)
_JOINED = re.compile(r"(\d+)/(\d+) clients joined")


def rendezvous_message(exc: BaseException, timeout_s: float, env: Mapping[str, str] | None = None,
                       host: str | None = None) -> str:
    """One line for a process group that could not form: who, which endpoint, how long, what to check."""
    env = os.environ if env is None else env
    host = host or socket.gethostname()
    endpoint = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    who = f"rank {env.get('RANK', '?')} of {env.get('WORLD_SIZE', '?')} on {host}"
    detail = first_line(exc)
    joined = _JOINED.search(detail)
    name = type(exc).__name__
    if "EADDRINUSE" in detail or "address already in use" in detail.lower():
        return (f"{who}: the rendezvous port {endpoint} is already in use on this node (another job, or a leftover "
                f"process of an earlier one); pick a free port (--master_port / MASTER_PORT / RDZV_ENDPOINT) or stop "
                f"that process [{name}: {detail}]")
    if joined:
        what = (f"only {joined.group(1)} of {joined.group(2)} ranks joined the rendezvous at {endpoint} within "
                f"{timeout_s:g}s: start the missing node(s) with this endpoint, or raise --train.dist_timeout_s "
                f"if they start later")
    elif name == "DistNetworkError" or "connect to" in detail:
        what = (f"could not reach the rendezvous at {endpoint} (MASTER_ADDR:MASTER_PORT from the launcher) within "
                f"{timeout_s:g}s: check that the master node is up, that the port is open from this node, and that "
                f"every node was given the same endpoint")
    else:
        what = (f"could not connect the backend to the other ranks (rendezvous {endpoint}) within {timeout_s:g}s")
    ifnames = ", ".join(f"{k}={env[k]}" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k in env) or "unset"
    return (f"{who} {what}; GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME must name the interface the nodes share "
            f"(now {ifnames}) [{name}: {detail}]")


def is_connect_error(exc: BaseException) -> bool:
    """A failure to form the process group (network, store, backend), as opposed to a bug."""
    import torch.distributed as td

    if isinstance(exc, (td.DistError, TimeoutError, ConnectionError)):
        return True
    return isinstance(exc, RuntimeError) and bool(_BACKEND_ERROR.search(str(exc)))


@contextmanager
def explain_init_errors(timeout_s: float) -> Iterator[None]:
    """Around process-group creation: a rendezvous/backend failure becomes a UserError naming host:port and timeout."""
    try:
        yield
    except Exception as exc:
        if world_size() > 1 and is_connect_error(exc):
            raise UserError(rendezvous_message(exc, timeout_s)) from None
        raise
