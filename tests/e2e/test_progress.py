"""Progress without a terminal: plain ASCII lines (no control characters), then one summary line."""

from __future__ import annotations

import re

from tests.support.cli import run_cli
from tests.support.data import BIG_ARGS, manifest_of


def test_plain_ascii_progress_and_summary(big_corpus, tmp_path):
    out = tmp_path / "out"
    # interval 0: a line at every update, so a ~10-chunk corpus gives several.
    r = run_cli("prepare", f"--data.source={big_corpus}", *BIG_ARGS, "--log.interval_s=0", f"--data.dir={out}")
    assert r.code == 0, r.err
    assert r.err == ""
    assert r.out.isascii()
    assert all(ch == "\n" or 32 <= ord(ch) < 127 for ch in r.out), "control characters in non-TTY output"
    lines = r.out.splitlines()
    progress = [ln for ln in lines if ln.startswith("prepare: docs ")]
    assert len(progress) >= 3
    docs = []
    for ln in progress:
        m = re.fullmatch(r"prepare: docs ([\d,]+)  tokens [\d.]+[KMG]?  [\d.]+[KMG]? tok/s  written [\d.]+ MB  "
                         r"elapsed \d+s", ln)
        assert m, ln
        docs.append(int(m.group(1).replace(",", "")))
    assert docs == sorted(docs) and docs[-1] == 1580
    summary = lines[-1]
    m = manifest_of(out)
    sp = m["splits"]
    tokens = sum(s["n_tokens"] for s in sp.values())
    assert summary.startswith(f"prepared 1,580 docs -> {tokens:,} tokens -> train {sp['train']['n_blocks']:,} blocks, "
                              f"validation {sp['validation']['n_blocks']:,} blocks of 128 (uint16) in ")
    assert summary.endswith(f"-> {out}")
    assert all(not ln.startswith("prepared ") for ln in lines[:-1])
