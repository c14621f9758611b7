"""Writes distclm/assets/pydoc_chat.jsonl.gz: short user/assistant exchanges about Python, made offline.

    python -m distclm.assets.make_pydoc_chat          # regenerates the file (deterministic: seeded, sorted)

Every answer is a run of sentences of one topic of Python's own documentation (`pydoc_data.topics`, the
Python Software Foundation's text under the PSF License); the questions, the choice of sentences and the
multi-turn follow-ups are this project's (MIT, as distclm). Answers range from one sentence to a long
paragraph, on purpose: the loss under accumulation must weigh every answer token alike.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

OUT = Path(__file__).with_name("pydoc_chat.jsonl.gz")
QUESTIONS = ["What is {t} in Python?", "Explain {t}.", "How does {t} work?", "Tell me about {t}.",
             "Can you describe {t} briefly?", "What should I know about {t}?"]
FOLLOW_UPS = ["Tell me more.", "Go on.", "And what else?", "Can you continue?"]
SYSTEM = "You are a concise assistant for the Python language."


def sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat) if 20 <= len(s) <= 400]


def exchanges(seed: int = 0) -> list[dict]:
    from pydoc_data.topics import topics

    rng, out = random.Random(seed), []
    for name in sorted(topics):
        said = sentences(topics[name])
        subject = name.replace("-", " ")
        at = 0
        while at < len(said) and len(out) < 10_000:
            n = rng.choice([1, 1, 2, 3, 5, 8])  # very different answer lengths
            answer, at = " ".join(said[at:at + n]), at + n
            messages = [{"role": "user", "content": rng.choice(QUESTIONS).format(t=subject)},
                        {"role": "assistant", "content": answer}]
            if rng.random() < 0.25 and at < len(said):  # a second turn
                more, at = " ".join(said[at:at + rng.choice([1, 2, 4])]), at + 2
                messages += [{"role": "user", "content": rng.choice(FOLLOW_UPS)},
                             {"role": "assistant", "content": more}]
            if rng.random() < 0.2:
                messages.insert(0, {"role": "system", "content": SYSTEM})
            out.append({"id": f"{name}-{len(out)}", "messages": messages})
            at += rng.choice([0, 2, 6])  # skip some: not every sentence is taken
    return out


def main() -> None:
    rows = exchanges()
    with open(OUT, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        for row in rows:
            fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    print(f"{len(rows)} exchanges -> {OUT}")


if __name__ == "__main__":
    main()
