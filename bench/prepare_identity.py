"""The identity row of bench/prepare.py: what identity by content (issue 28, rule 3) costs a prepare.

    python bench/prepare.py --identity-only [--corpus PATH] [--repeats N]     (the full bench appends this row too)

Both legs are `distclm.data.prepare.prepare` called in this process, the whole call (tokenizer load included),
on the same corpus, in interleaved rounds (on, off, on, off, ...) so that outside load hits both alike; medians.

  with identity   this checkout: the sha256 of every input file before reading (the resume and re-run identity),
                  the same hash again after reading (an edit during prepare publishes nothing), and the tokenizer
                  saved into DATA/tokenizer/
  today's         the identity before rule 3 patched back in: input file names and sizes only, no second hash,
                  no saved tokenizer

Also timed alone: one hash pass over the input (`identity.input_identity`, the file in the page cache) and the
tokenizer saved (`identity.save_tokenizer`): on a shared machine the two legs' difference is mostly noise, and the
parts say what the difference should be. One warm-up run first; rounds alternate which leg goes first. The target
is at most 5% of prepare's wall time.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

TARGET = 0.05


def _names_and_sizes(spec) -> list:
    """The input identity before rule 3: local file names and sizes."""
    from distclm.data import sources

    if spec.source in sources.EMBEDDED or not sources.is_local_source(spec.source):
        return []
    return [[os.path.basename(f), os.path.getsize(f)] for f in sources.local_files(spec.source)]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _prepare_seconds(config, out: Path, identity: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one whole prepare() call; CPU = this process's user + system time, all threads."""
    import distclm.data.prepare as prep

    kept = prep.input_identity, prep.check_unchanged, prep.save_tokenizer
    if not identity:
        prep.input_identity, prep.check_unchanged, prep.save_tokenizer = (
            _names_and_sizes, lambda *a: None, lambda *a: None)
    shutil.rmtree(out, ignore_errors=True)
    try:
        t0, c0 = time.perf_counter(), _cpu()
        prep.prepare(config(out))
        return time.perf_counter() - t0, _cpu() - c0
    finally:
        prep.input_identity, prep.check_unchanged, prep.save_tokenizer = kept
        shutil.rmtree(out, ignore_errors=True)


def identity_rows(corpus: Path, work: Path, repeats: int, config, settle=None) -> list[str]:
    """Markdown rows: prepare with identity by content vs today's identity, and one hash pass alone."""
    from distclm.data import sources
    from distclm.data.identity import input_identity, save_tokenizer
    from distclm.data.tokenize import load_tokenizer

    spec, tok = sources.SourceSpec(str(corpus)), load_tokenizer("gpt2")
    _prepare_seconds(config, work / "identity", True)  # warm-up (imports, page cache), not counted
    on, off, hashing, saving = [], [], [], []
    for i in range(repeats):
        legs = ((True, on), (False, off))
        for identity, runs in legs if i % 2 == 0 else legs[::-1]:  # alternate which leg goes first
            if settle:
                settle()
            runs.append(_prepare_seconds(config, work / "identity", identity))
        t0 = time.perf_counter()
        input_identity(spec)
        t1 = time.perf_counter()
        save_tokenizer(tok, work / "tokenizer")
        hashing.append(t1 - t0)
        saving.append(time.perf_counter() - t1)
    m_on, m_off = (statistics.median(w for w, _ in runs) for runs in (on, off))
    c_on, c_off = (statistics.median(c for _, c in runs) for runs in (on, off))
    m_hash = statistics.median(hashing)
    m_save = statistics.median(saving)
    extra = m_on / m_off - 1
    size = corpus.stat().st_size
    return [
        f"Identity by content (issue 28 rule 3), `prepare()` in-process on `{corpus.name}` ({size / 2**20:.1f} MB on "
        f"disk), the whole call; median of {repeats} interleaved round(s):",
        "",
        "| | with identity by content | today's (names + sizes) | extra | one hash pass alone | tokenizer saved "
        "alone | target |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| prepare wall time | {m_on:.3f} s | {m_off:.3f} s | {extra:+.1%} | {m_hash * 1e3:.1f} ms "
        f"(x2 = {2 * m_hash / m_off:.1%}) | {m_save * 1e3:.1f} ms ({m_save / m_off:.1%}) | <= {TARGET:.0%}: "
        f"{'met' if extra <= TARGET else 'MISSED'} (the parts: {(2 * m_hash + m_save) / m_off:.1%}) |",
        f"| prepare CPU time (user + system, all threads) | {c_on:.3f} s | {c_off:.3f} s | {c_on / c_off - 1:+.1%} "
        f"| | | <= {TARGET:.0%}: {'met' if c_on / c_off - 1 <= TARGET else 'MISSED'} |",
        "",
        "wall (s): with " + ", ".join(f"{w:.3f}" for w, _ in on) + "; today's " + ", ".join(f"{w:.3f}" for w, _ in off),
    ]
