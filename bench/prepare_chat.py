"""The chat row of bench/prepare.py: chat prepare against the text path on the same records, side by side.

    python bench/prepare.py --chat-only [--repeats N]        (the full bench appends these rows too)

On the shipped chat corpus (distclm/assets/pydoc_chat.jsonl.gz), block size 256:
  text   the same records prepared as text (`--data.format=text --data.text_field=messages.content`): every
         message's content joined, tokenized, packed by cutting the stream
  chat   `--data.format=chat`: rendered with the default template, one tokenization per piece, the mask,
         first-fit packing of whole samples
tokens/s in-process = tokens / seconds from the first record read to the manifest written (tokenizer load
excluded); rounds interleave text and chat. Peak RSS: `distclm prepare` as a whole process on the corpus x1
and x4 (it must not grow with the corpus).
"""

from __future__ import annotations

import gzip
import json
import shutil
import statistics
from pathlib import Path

BLOCK = 256


def _inprocess(source: str, out: Path, extra: dict) -> dict:
    from distclm.config import build_config
    from distclm.data.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config(None, None, {"data.source": source, "data.block_size": str(BLOCK), "data.dir": str(out),
                                    **extra})
    result = prepare(cfg)
    tokens = sum(s["n_tokens"] for s in result.manifest["splits"].values())
    shutil.rmtree(out)
    return {"tokens": tokens, "seconds": result.stream_seconds}


def _command_rss(run_measured, command: list[str], source: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = run_measured(command + ["prepare", f"--data.source={source}", f"--data.block_size={BLOCK}",
                                f"--data.dir={out}", "--data.format=chat"])
    tokens = sum(s["n_tokens"] for s in json.loads((out / "manifest.json").read_text())["splits"].values())
    shutil.rmtree(out)
    return {"peak_rss": r["peak_rss"], "wall": r["wall"], "tokens": tokens}


def chat_rows(work: Path, repeats: int, run_measured, command: list[str], settle) -> list[str]:
    """Markdown lines: chat vs text tokens/s on the same records, and the chat command's peak RSS x1 / x4."""
    from distclm.data.sources import PYDOC_CHAT

    corpus4 = work / "pydoc_chat-x4.jsonl.gz"
    with gzip.open(PYDOC_CHAT, "rb") as fh:
        raw = fh.read()
    with gzip.open(corpus4, "wb") as fh:
        fh.write(raw * 4)
    runs: dict[str, list] = {"text": [], "chat": [], "cli1": [], "cli4": []}
    for _ in range(repeats):
        settle()
        runs["text"].append(_inprocess(str(PYDOC_CHAT), work / "t", {"data.format": "text",
                                                                     "data.text_field": "messages.content"}))
        settle()
        runs["chat"].append(_inprocess(str(PYDOC_CHAT), work / "c", {"data.format": "chat"}))
        settle()
        runs["cli1"].append(_command_rss(run_measured, command, PYDOC_CHAT, work / "c1"))
        runs["cli4"].append(_command_rss(run_measured, command, corpus4, work / "c4"))
    rate = {k: statistics.median(r["tokens"] / r["seconds"] for r in runs[k]) for k in ("text", "chat")}
    rss = {k: statistics.median(r["peak_rss"] for r in runs[k]) for k in ("cli1", "cli4")}
    ratio = rate["chat"] / rate["text"]
    return [
        f"Chat: the shipped chat corpus ({runs['chat'][0]['tokens']:,} tokens as chat), block size {BLOCK}, "
        f"median of {repeats} run(s).",
        "",
        "| | text path (same records) | chat prepare | chat / text |",
        "|---|---:|---:|---:|",
        f"| in-process tokens/s | {rate['text']:,.0f} | {rate['chat']:,.0f} | {ratio:.2f} |",
        f"| `distclm prepare --data.format=chat` peak RSS, corpus x1 / x4 | | {rss['cli1'] / 2**20:.0f} MB / "
        f"{rss['cli4'] / 2**20:.0f} MB | x4/x1 {rss['cli4'] / rss['cli1']:.2f} |",
        "",
        f"Targets: chat tokens/s >= half the text path's: {'met' if ratio >= 0.5 else 'MISSED'}; chat peak RSS x4 "
        f"within 10% of x1: {'met' if abs(rss['cli4'] / rss['cli1'] - 1) <= 0.10 else 'MISSED'}.",
    ]
