"""What the user sees: rich on a terminal, plain ASCII lines when stdout is not one (CI, Kubernetes logs).

Only rank 0 prints; on other ranks every method is a no-op, so callers never test the rank.
"""

from __future__ import annotations

import sys
import time

from distclm import dist


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (SI prefixes; `unit` appended)."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{prefix}{unit}"
    return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.2f}{unit}"


class PrepareProgress:
    """Progress of `prepare`: documents, tokens/s, MB written.

    Terminal: a rich progress line, redrawn in place. Otherwise: one plain line every `interval_s`.
    """

    def __init__(self, interval_s: float = 5.0, tty: bool | None = None, total_docs: int | None = None):
        self.enabled = dist.is_rank0()
        self.tty = stdout_is_tty() if tty is None else tty
        self.interval_s = interval_s
        self.t0 = time.perf_counter()
        self._last = self.t0
        self._rich = None
        if self.enabled and self.tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(TextColumn("[bold]prepare[/]"), BarColumn(bar_width=None) if total_docs else
                                  TextColumn(""), TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                  transient=True)
            self._task = self._rich.add_task("prepare", total=total_docs, stats="")
            self._rich.start()

    def _stats(self, docs: int, tokens: int, bytes: int) -> str:
        rate = tokens / max(time.perf_counter() - self.t0, 1e-9)
        return f"docs {docs:,}  tokens {human(tokens)}  {human(rate)} tok/s  written {bytes / 1e6:.1f} MB"

    def update(self, docs: int, tokens: int, bytes: int) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=docs, stats=self._stats(docs, tokens, bytes))
            return
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._last = now
            print(f"prepare: {self._stats(docs, tokens, bytes)}  elapsed {now - self.t0:.0f}s", flush=True)

    def note(self, message: str) -> None:
        if self.enabled:
            (self._rich.console.print if self._rich else print)(f"prepare: {message}")

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
