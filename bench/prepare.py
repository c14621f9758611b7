"""Side-by-side benchmark of `distclm prepare` against the Hugging Face causal-LM tutorial's preprocessing.

    python bench/prepare.py [--corpus PATH] [--repeats N] [--quick] [--chat-only] [--identity-only]   (or `make bench`)

The chat row (bench/prepare_chat.py) follows the text table: chat prepare against the text path on the same
records of the shipped chat corpus. The identity row (bench/prepare_identity.py) follows it: prepare with the
input and tokenizer identity by content against today's names-and-sizes identity, interleaved.

Measured in one run, on the same corpus (default ../shared/corpora/pydocs.jsonl.gz, text field
`answers.text` joined with " "), block size 128:

  tutorial   the tutorial's own pipeline, reproduced faithfully in a child process: `load_dataset("json")`,
             `flatten()`, `map(tokenize, batched=True, num_proc=2)`, `map(group_texts, batched=True,
             num_proc=2)` with its `sum(examples[k], [])` concatenation; a fresh datasets cache per run,
             so nothing is served from an earlier run.
  floor      tiktoken `encode_ordinary_batch` alone on the same texts (read beforehand), with the
             vendored GPT-2 ranks: the cost of tokenizing and nothing else.
  distclm    `distclm.data.prepare.prepare` called in this process (in-process), and `distclm prepare`
             as a whole command (what a user waits for: imports, tokenizer load, everything), on the
             corpus and on the corpus repeated 4 times (peak memory must not grow with the corpus).

tokens/s in-process = tokens / seconds from the first document read to the last output written
(tutorial: load_dataset .. group_texts; distclm: first document read .. manifest written; tokenizer
load excluded from both). Whole process = tokens / wall time of the command. The machine's cores may
be shared: each measurement waits for other processes to go quiet (--settle) and the report says how
much CPU they took. Peak RSS = the largest
sum of resident memory over the process and all its children, polled every 10 ms (and never less
than the high-water mark of its largest process). Every timing is the median of --repeats
runs. The table is printed and written to bench/out/prepare.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's distclm, installed or not
DEFAULT_CORPUS = REPO.parent / "shared" / "corpora" / "pydocs.jsonl.gz"
OUT = REPO / "bench" / "out" / "prepare.md"
TEXT_FIELD = "answers.text"
BLOCK_SIZE = 128
NUM_PROC = 2  # the tutorial's num_proc


# ---------------------------------------------------------------------------------------------
# The tutorial's preprocessing (runs in a child process: `python bench/prepare.py --tutorial-child`)


def tutorial_child(corpus: str) -> None:
    """The HF causal-LM tutorial's preprocessing, as written there; prints one JSON line of results."""
    from datasets import load_dataset
    from transformers import GPT2TokenizerFast

    from distclm.data.tokenize import VENDORED_GPT2

    tokenizer = GPT2TokenizerFast.from_pretrained(str(VENDORED_GPT2))  # the tutorial: "distilbert/distilgpt2"
    t0 = time.perf_counter()
    eli5 = load_dataset("json", data_files=corpus, split="train")
    eli5 = eli5.flatten()

    def preprocess_function(examples):
        return tokenizer([" ".join(x) for x in examples["answers.text"]])

    tokenized = eli5.map(preprocess_function, batched=True, num_proc=NUM_PROC, remove_columns=eli5.column_names)

    block_size = BLOCK_SIZE

    def group_texts(examples):
        # Concatenate all texts.
        concatenated_examples = {k: sum(examples[k], []) for k in examples.keys()}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        # We drop the small remainder, we could add padding if the model supported it instead of this drop.
        if total_length >= block_size:
            total_length = (total_length // block_size) * block_size
        # Split by chunks of block_size.
        result = {
            k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated_examples.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    lm_dataset = tokenized.map(group_texts, batched=True, num_proc=NUM_PROC)
    seconds = time.perf_counter() - t0
    tokens = sum(len(ids) for ids in tokenized["input_ids"])  # tokens it produced (counted after timing)
    print(json.dumps({"seconds": seconds, "tokens": tokens, "blocks": len(lm_dataset)}))


# ---------------------------------------------------------------------------------------------
# Measuring a child process: wall time and peak resident memory of its whole process tree


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`: wall seconds, peak RSS in bytes of all its processes together, stdout. Exits on failure.

    Every 10 ms: the sum of the current RSS of the process and all its children (psutil), and each
    one's own high-water mark (VmHWM, Linux), which catches a single process's peak between samples.
    Peak = the larger of the two. Not wait4's ru_maxrss: after fork+exec the child inherits the
    parent's high-water mark, here the benchmark's own ~170 MB.
    Output goes to files, not pipes: a chatty child must never block on a full pipe.
    """
    import psutil

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        root = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            total = 0
            try:
                for p in [root] + root.children(recursive=True):
                    total += p.memory_info().rss
                    peak = max(peak, high_water_rss(p.pid))
            except psutil.Error:  # a process ended between listing and reading: skip this sample
                pass
            peak = max(peak, total)
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} exited with {proc.returncode}:\n{stderr[-3000:]}")
    return {"wall": wall, "peak_rss": peak, "stdout": stdout}


def high_water_rss(pid: int) -> int:
    """A process's peak resident memory so far in bytes (VmHWM; 0 where /proc does not say)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------
# The measurements


def tutorial_run(corpus: Path) -> dict:
    """One run of the tutorial's pipeline in a fresh process with an empty datasets cache."""
    with tempfile.TemporaryDirectory(prefix="bench-hfcache-") as cache:
        env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        r = run_measured([sys.executable, __file__, "--tutorial-child", str(corpus)], env)
    result = json.loads(r["stdout"].strip().splitlines()[-1])
    return {**result, "wall": r["wall"], "peak_rss": r["peak_rss"]}


def read_texts(corpus: Path) -> list[str]:
    """The documents' text exactly as prepare extracts it (answers.text joined with " ")."""
    from distclm.data import sources

    spec = sources.SourceSpec(str(corpus), text_field=TEXT_FIELD, join_with=" ")
    return list(sources.documents(spec))


def floor_run(enc, texts: list[str]) -> dict:
    """tiktoken `encode_ordinary_batch` alone, one thread per core, texts already in memory."""
    t0 = time.perf_counter()
    ids = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
    return {"seconds": time.perf_counter() - t0, "tokens": sum(map(len, ids))}


def prepare_config(corpus: Path, out: Path):
    from distclm.config import build_config

    return build_config(None, None, {"data.source": str(corpus), "data.text_field": TEXT_FIELD,
                                     "data.block_size": str(BLOCK_SIZE), "data.dir": str(out)})


def inprocess_run(corpus: Path, out: Path) -> dict:
    """`prepare()` called here: seconds from the first document read to the manifest written."""
    from distclm.data.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    result = prepare(prepare_config(corpus, out))
    tokens = sum(s["n_tokens"] for s in result.manifest["splits"].values())
    shutil.rmtree(out)
    return {"seconds": result.stream_seconds, "total_seconds": result.seconds, "tokens": tokens}


def distclm_command() -> list[str]:
    script = Path(sys.executable).with_name("distclm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "distclm.cli"]


def command_run(corpus: Path, out: Path) -> dict:
    """`distclm prepare` as a user runs it: wall time and peak RSS of the whole process."""
    shutil.rmtree(out, ignore_errors=True)
    r = run_measured(distclm_command() + ["prepare", f"--data.source={corpus}", f"--data.text_field={TEXT_FIELD}",
                                          f"--data.block_size={BLOCK_SIZE}", f"--data.dir={out}"])
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out)
    return {"wall": r["wall"], "peak_rss": r["peak_rss"], "tokens": sum(s["n_tokens"] for s in manifest["splits"].values())}


class OtherLoad:
    """CPU time that other processes used since `start()`, as a share of all CPUs (Linux /proc/stat).

    Every measurement here is a wall-clock time on shared cores: say when something else competed.
    """

    def __init__(self):
        self.start()

    def start(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as fh:
                ticks = [int(x) for x in fh.readline().split()[1:9]]
        except OSError:
            return None
        t = os.times()
        own = (t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK")
        return sum(ticks), ticks[3] + ticks[4], own  # all, idle + iowait, this process and its children

    def share(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[0] == self._start[0]:
            return None
        total, idle, own = (e - s for e, s in zip(end, self._start))
        return min(1.0, max(0.0, (total - idle - own) / total))


def wait_quiet(max_wait_s: float, threshold: float = 0.10) -> float | None:
    """Wait (up to max_wait_s) until other processes use < threshold of the CPUs over 1 s; their last share."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = OtherLoad()
        time.sleep(1.0)
        share = load.share()
        if share is None or share < threshold or time.monotonic() >= deadline:
            return share


def imports_torch(corpus: Path, out: Path) -> bool:
    """Whether a whole `distclm prepare` run pulls in torch (it must not: ~1.2 s and ~220 MB)."""
    code = ("import sys; from distclm.cli import main; "
            f"rc = main(['prepare', '--data.source={corpus}', '--data.text_field={TEXT_FIELD}', '--data.dir={out}']); "
            "print('torch' in sys.modules)")
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    shutil.rmtree(out)
    return proc.stdout.strip().splitlines()[-1] == "True"


def summarise(runs: list[dict]) -> dict:
    """Median of each numeric field over the runs (+ the runs themselves)."""
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"runs": runs}


# ---------------------------------------------------------------------------------------------
# Report


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x / 1e3:.0f} K"


def mb(x: float) -> str:
    return f"{x / 2**20:.0f} MB"


def report(corpus: Path, repeats: int, tut: dict, floor: dict, inproc: dict, cli1: dict, cli4: dict,
           torch_imported: bool, other_load: tuple[float, float] | None) -> str:
    rate = {"tut": tut["tokens"] / tut["seconds"], "floor": floor["tokens"] / floor["seconds"],
            "inproc": inproc["tokens"] / inproc["seconds"]}
    whole = {"tut": tut["tokens"] / tut["wall"], "cli1": cli1["tokens"] / cli1["wall"],
             "cli4": cli4["tokens"] / cli4["wall"]}
    lines = [
        f"Corpus `{corpus.name}` ({tut['tokens']:,} tokens by the tutorial's tokenizer, {inproc['tokens']:,} in "
        f"distclm's blocks incl. one EOS per document), block size {BLOCK_SIZE}; median of {repeats} run(s); "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}.",
        "",
        "| | tutorial (datasets.map, num_proc=2) | tokenize floor (tiktoken alone) | distclm prepare | "
        "distclm / tutorial | distclm / floor |",
        "|---|---:|---:|---:|---:|---:|",
        f"| in-process tokens/s (first document read .. output written) | {fmt_rate(rate['tut'])} | "
        f"{fmt_rate(rate['floor'])} | {fmt_rate(rate['inproc'])} | {rate['inproc'] / rate['tut']:.1f}x | "
        f"{rate['inproc'] / rate['floor']:.0%} |",
        f"| in-process seconds | {tut['seconds']:.2f} | {floor['seconds']:.2f} | {inproc['seconds']:.2f} | | |",
        f"| whole process wall time (imports, tokenizer load, everything) | {tut['wall']:.2f} s | | "
        f"{cli1['wall']:.2f} s | {tut['wall'] / cli1['wall']:.1f}x faster | |",
        f"| whole process tokens/s | {fmt_rate(whole['tut'])} | | {fmt_rate(whole['cli1'])} | "
        f"{whole['cli1'] / whole['tut']:.1f}x | |",
        f"| peak RSS, all processes | {mb(tut['peak_rss'])} | | {mb(cli1['peak_rss'])} | "
        f"{cli1['peak_rss'] / tut['peak_rss']:.2f}x | |",
        "",
        "| `distclm prepare` (whole process) | corpus x1 | corpus x4 | x4 / x1 |",
        "|---|---:|---:|---:|",
        f"| tokens | {cli1['tokens']:,} | {cli4['tokens']:,} | {cli4['tokens'] / cli1['tokens']:.2f} |",
        f"| wall time | {cli1['wall']:.2f} s | {cli4['wall']:.2f} s | {cli4['wall'] / cli1['wall']:.2f} |",
        f"| tokens/s | {fmt_rate(whole['cli1'])} | {fmt_rate(whole['cli4'])} | {whole['cli4'] / whole['cli1']:.2f} |",
        f"| peak RSS | {mb(cli1['peak_rss'])} | {mb(cli4['peak_rss'])} | {cli4['peak_rss'] / cli1['peak_rss']:.2f} |",
        "",
        f"distclm in-process including the tokenizer load: {inproc['total_seconds']:.2f} s "
        f"({fmt_rate(inproc['tokens'] / inproc['total_seconds'])} tokens/s). "
        f"`distclm prepare` imports torch: {'YES (it must not)' if torch_imported else 'no'}.",
    ]
    targets = [
        ("in-process tokens/s >= 8x the tutorial's", rate["inproc"] >= 8 * rate["tut"]),
        ("in-process tokens/s >= 75% of the tokenize floor", rate["inproc"] >= 0.75 * rate["floor"]),
        ("peak RSS <= 400 MB (x1 and x4)", max(cli1["peak_rss"], cli4["peak_rss"]) <= 400 * 2**20),
        ("peak RSS x4 within 10% of x1", abs(cli4["peak_rss"] / cli1["peak_rss"] - 1) <= 0.10),
        ("prepare does not import torch", not torch_imported),
    ]
    lines += ["", "Targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in targets) + "."]
    if other_load is not None:
        median, worst = other_load
        lines += ["", f"Other processes took {median:.0%} of the CPUs during a measurement (median; worst {worst:.0%})"
                  + (": the timings above are disturbed, rerun on a quiet machine." if median > 0.1 else ".")]
    return "\n".join(lines) + "\n"


def chat_table(args, repeats: int) -> list[str]:
    """The chat row: chat prepare vs the text path on the same records (bench/prepare_chat.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prepare_chat import chat_rows

    with tempfile.TemporaryDirectory(prefix="bench-prepare-chat-") as tmp:
        # this checkout's distclm in the child too, installed or not
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        return chat_rows(Path(tmp), repeats, lambda cmd: run_measured(cmd, env=env),
                         [sys.executable, "-m", "distclm.cli"], lambda: wait_quiet(args.settle) if args.settle > 0 else None)


def identity_table(args, corpus: Path, repeats: int) -> list[str]:
    """The identity row: prepare with identity by content vs today's (bench/prepare_identity.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from prepare_identity import identity_rows

    load = OtherLoad()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-identity-") as tmp:
        rows = identity_rows(corpus, Path(tmp), repeats, lambda out: prepare_config(corpus, out),
                             (lambda: wait_quiet(args.settle)) if args.settle > 0 else None)
    share = load.share()
    return rows + ([f"Other processes took {share:.0%} of the CPUs meanwhile."] if share is not None else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="a .jsonl(.gz) with an answers.text field")
    ap.add_argument("--repeats", type=int, default=5, help="runs per measurement; medians are reported")
    ap.add_argument("--quick", action="store_true", help="one run per measurement (a smoke run)")
    ap.add_argument("--settle", type=float, default=30.0,
                    help="seconds to wait, at most, for other processes to go quiet before each measurement (0: never)")
    ap.add_argument("--chat-only", action="store_true", help="only the chat row (chat vs text on the chat corpus)")
    ap.add_argument("--identity-only", action="store_true",
                    help="only the identity row (prepare with identity by content vs today's names and sizes)")
    ap.add_argument("--tutorial-child", metavar="CORPUS", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tutorial_child:
        tutorial_child(args.tutorial_child)
        return 0
    if args.chat_only:
        print("\n".join(chat_table(args, 1 if args.quick else max(1, args.repeats))))
        return 0
    corpus = args.corpus.resolve()
    if not corpus.is_file():
        raise SystemExit(f"bench: --corpus {corpus}: no such file (the default lives in ../shared/corpora)")
    repeats = 1 if args.quick else max(1, args.repeats)
    if args.identity_only:
        print("\n".join(identity_table(args, corpus, repeats)))
        return 0

    from distclm.data.tokenize import gpt2_encoding

    texts, enc = read_texts(corpus), gpt2_encoding()
    enc.encode_ordinary_batch(texts[:64])  # warm tiktoken's regex and thread-pool paths once
    names = ["tutorial", "floor", "inprocess", "cli1", "cli4"]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        work = Path(tmp)
        corpus4 = work / ("x4-" + corpus.name)
        data = corpus.read_bytes()
        if not corpus.name.endswith(".gz") and not data.endswith(b"\n"):
            data += b"\n"
        corpus4.write_bytes(data * 4)  # gzip members one after another are one valid gzip stream
        steps = {"tutorial": lambda: tutorial_run(corpus), "floor": lambda: floor_run(enc, texts),
                 "inprocess": lambda: inprocess_run(corpus, work / "inproc"),
                 "cli1": lambda: command_run(corpus, work / "cli"), "cli4": lambda: command_run(corpus4, work / "cli")}
        # Rounds interleave the measurements, so a burst of outside load hits all of them alike; each
        # measurement first waits (up to --settle s) for the other processes to go quiet.
        for i in range(repeats):
            t0 = time.perf_counter()
            for name in names:
                if args.settle > 0:
                    wait_quiet(args.settle)
                load = OtherLoad()
                runs[name].append(steps[name]())
                share = load.share()
                if share is not None:
                    loads.append(share)
            print(f"bench: round {i + 1}/{repeats} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        other = (statistics.median(loads), max(loads)) if loads else None
        torch_imported = imports_torch(corpus, work / "torch-check")
    table = report(corpus, repeats, *(summarise(runs[name]) for name in names), torch_imported, other)
    table += "\n" + "\n".join(chat_table(args, repeats)) + "\n"
    table += "\n" + "\n".join(identity_table(args, corpus, repeats)) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(table, encoding="utf-8")
    print(table, end="")
    print(f"(written to {OUT.relative_to(REPO)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
