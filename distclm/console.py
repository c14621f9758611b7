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


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainConsole:
    """Rank 0's view of training. Terminal: a rich live panel. Otherwise: a plain ASCII line every interval_s.

    `update` takes the same record that goes to metrics.jsonl, plus display-only fields.
    """

    def __init__(self, total_steps: int, interval_s: float = 10.0, tty: bool | None = None, title: str = "train"):
        self.enabled = dist.is_rank0()
        self.tty = stdout_is_tty() if tty is None else tty
        self.total_steps = total_steps
        self.interval_s = interval_s
        self.title = title
        self._last_print = 0.0
        self._live = None
        self._smoothed = None
        self.last_eval: dict | None = None
        self._load = "-"  # a mixture of experts: the expert load of the latest log step

    def start(self) -> None:
        if self.enabled and self.tty:
            from rich.live import Live

            self._live = Live(self._panel({}), refresh_per_second=4, transient=False)
            self._live.start()

    def _panel(self, r: dict):
        from rich.panel import Panel
        from rich.table import Table

        grid = Table.grid(padding=(0, 2))
        for _ in range(4):
            grid.add_column(justify="right", style="bold")
            grid.add_column()
        mfu = r.get("mfu")
        ev = self.last_eval
        rows = [
            ("step", f"{r.get('step', 0)}/{self.total_steps}", "epoch", f"{r.get('epoch', 0):.2f}",
             "loss", f"{self._smoothed:.4f}" if self._smoothed is not None else "-",
             "lr", f"{r.get('lr', 0):.2e}"),
            ("tok/s", human(r.get("tokens_per_s") or 0), "tok/s/dev", human(r.get("tokens_per_s_per_device") or 0),
             "samples/s", f"{r.get('samples_per_s') or 0:.1f}", "MFU", f"{mfu:.1%}" if mfu is not None else "n/a"),
            ("grad norm", f"{r.get('grad_norm', 0):.3f}", "memory", human(r.get("mem_bytes") or 0, "B"),
             "elapsed", _fmt_eta(r.get("elapsed_s")), "ETA", _fmt_eta(r.get("eta_s"))),
            ("eval ppl", f"{ev['eval_perplexity']:.2f}" if ev else "-", "eval loss",
             f"{ev['eval_loss']:.4f}" if ev else "-", *self._experts(r, ("aux loss", "experts"))),
        ]
        for row in rows:
            grid.add_row(*row)
        return Panel(grid, title=f"distclm {self.title}", border_style="cyan")

    def update(self, record: dict, force: bool = False) -> None:
        if not self.enabled:
            return
        loss = record.get("loss")
        if loss is not None and loss == loss:
            self._smoothed = loss if self._smoothed is None else 0.9 * self._smoothed + 0.1 * loss
        if self._live is not None:
            self._live.update(self._panel(record))
            return
        import time

        now = time.monotonic()
        if force or now - self._last_print >= self.interval_s:
            self._last_print = now
            mfu = record.get("mfu")
            ev = f" eval_ppl {self.last_eval['eval_perplexity']:.2f}" if self.last_eval else ""
            moe = " ".join(("", *self._experts(record, ("aux", "experts")))).rstrip()
            print(f"step {record['step']}/{self.total_steps} epoch {record['epoch']:.2f} "
                  f"loss {record['loss']:.4f} lr {record['lr']:.2e} grad_norm {record['grad_norm']:.3f} "
                  f"tok/s {human(record.get('tokens_per_s') or 0)} "
                  f"({human(record.get('tokens_per_s_per_device') or 0)}/dev) "
                  f"mfu {'n/a' if mfu is None else f'{mfu:.1%}'} mem {human(record.get('mem_bytes') or 0, 'B')} "
                  f"elapsed {_fmt_eta(record.get('elapsed_s'))} eta {_fmt_eta(record.get('eta_s'))}{ev}{moe}", flush=True)

    def _experts(self, r: dict, names: tuple[str, str]) -> tuple[str, str, str, str]:
        """A mixture of experts: (name, aux loss, name, the latest expert load); blank for other models."""
        if r.get("experts"):
            self._load = f"max_share {r['experts']['max_share']:.2f} idle {r['experts']['idle']}"
        if r.get("aux_loss") is None:
            return "", "", "", ""
        return names[0], f"{r['aux_loss']:.4f}", names[1], self._load

    def eval(self, record: dict) -> None:
        self.last_eval = record
        folders = "".join(f"; {name}: {r['perplexity']:.2f}" for name, r in record.get("eval_by_dir", {}).items())
        self.print(f"eval step {record['step']}: loss {record['eval_loss']:.4f} "
                   f"perplexity {record['eval_perplexity']:.2f} ({record['eval_tokens']:,} tokens{folders})")

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._live is not None:
            self._live.console.print(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
