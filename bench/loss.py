"""The output layer's loss alone, forward + backward: the model's own (logits materialised, then
cross-entropy) against distclm's chunked linear + cross-entropy (distclm/loss.py), side by side.

    python bench/loss.py [--tokens 1016,4064] [--hidden 128,256] [--vocab 50257] [--repeats 7]

Random hidden states (N x H) and output weight (V x H), fp32, this machine's default threads. Each repeat
times both, alternating which goes first; the table shows medians (ms) and the ratio. Also checked once:
the loss and both gradients agree (max abs. difference). Written to bench/out/loss.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distclm.loss import ChunkedLinearCrossEntropy  # noqa: E402


def own(h, w, y):
    return F.cross_entropy(F.linear(h, w), y)


def chunked(h, w, y):
    return ChunkedLinearCrossEntropy.apply(h, w, None, y)


def timed(fn, h, w, y) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(seconds, loss, d h, d w) of one forward + backward."""
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    start = time.perf_counter()
    loss = fn(h, w, y)
    loss.backward()
    return time.perf_counter() - start, loss.item(), h.grad, w.grad


def row(n: int, hidden: int, vocab: int, repeats: int) -> str:
    torch.manual_seed(0)
    h, w, y = torch.randn(n, hidden), torch.randn(vocab, hidden) * 0.02, torch.randint(0, vocab, (n,))
    ref, got = timed(own, h, w, y), timed(chunked, h, w, y)  # also the warm-up of both
    diff = max(abs(ref[1] - got[1]), (ref[2] - got[2]).abs().max().item(), (ref[3] - got[3]).abs().max().item())
    times = {"own": [], "chunked": []}
    for r in range(repeats):
        for name, fn in ((("own", own), ("chunked", chunked)) if r % 2 == 0 else (("chunked", chunked), ("own", own))):
            times[name].append(timed(fn, h, w, y)[0])
    a, b = (statistics.median(times[k]) * 1000 for k in ("own", "chunked"))
    print(f"N={n} H={hidden} V={vocab}: own {a:.0f} ms, chunked {b:.0f} ms ({a / b:.2f}x), max diff {diff:.1e}",
          file=sys.stderr, flush=True)
    return f"| {n} x {hidden} x {vocab} | {a:.0f} ms | {b:.0f} ms | {a / b:.2f}x | {diff:.1e} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1016,4064", help="N, comma list (8 x 127 and 32 x 127: micro 8 and 32)")
    ap.add_argument("--hidden", default="128,256", help="H, comma list")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    lines = [f"Output layer forward + backward, fp32, {torch.get_num_threads()} threads, medians of {args.repeats}.",
             "", "| N x H x V | model's own | chunked (distclm) | speed-up | max diff (loss, dh, dW) |",
             "|---|---|---|---|---|"]
    lines += [row(int(n), int(hd), args.vocab, args.repeats) for n in args.tokens.split(",")
              for hd in args.hidden.split(",")]
    text = "\n".join(lines)
    print(text)
    (REPO / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "out" / "loss.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
