"""Fixtures of the whole suite. Helpers live in tests/support (imported as `tests.support.*`).

Everything runs offline and without /work/shared: the text is Python's own `pydoc_data.topics` (what
`--data.source=pydoc` reads) or small files written into tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.cli import Result, run_cli
from tests.support.data import BIG_ARGS, PYDOC_ARGS, pydoc_texts, write_jsonl
from tests.support.env import offline
from tests.support.runs import SHARED, SharedRuns

offline()

# The tiers (tests/README.md): `make test-fast` runs `-m "not slow and not extended"`. Every test in these folders
# starts several processes (torchrun/gloo, two network namespaces), so the folder marks it slow; a slow test
# elsewhere (tests/e2e, tests/deploy) carries `@pytest.mark.slow` itself.
SLOW_FOLDERS = ("dist", "multinode")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.is_relative_to(TESTS) and path.relative_to(TESTS).parts[0] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def cli(capsys):
    """Run `distclm ARGS` in this process: -> Result(exit code, stdout, stderr)."""
    from distclm.cli import main

    def run(*args) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def hf_gpt2():
    """The vendored GPT-2 tokenizer as transformers loads it (the reference for every id)."""
    from distclm.data.tokenize import load_hf_tokenizer

    return load_hf_tokenizer("gpt2")[0]


# ---------------------------------------------------------------------------------------------
# Prepared folders shared by many tests (treat as read-only; copy before damaging one)


@pytest.fixture(scope="session")
def pydoc_prepared(tmp_path_factory) -> Path:
    """`prepare --data.source=pydoc` with small shards: ~139 K tokens, 10 train + 2 validation shards."""
    from distclm.cli import main

    out = tmp_path_factory.mktemp("pydoc") / "prepared"
    assert main(["prepare", *PYDOC_ARGS, f"--data.dir={out}"]) == 0
    return out


@pytest.fixture(scope="session")
def big_corpus(tmp_path_factory) -> Path:
    """A ~10 MB jsonl: the pydoc topics 20 times over (1,580 documents, ~2.8 M tokens)."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    texts = pydoc_texts()
    write_jsonl(path, [{"id": f"{r}-{i}", "text": f"Copy {r}. {t}"} for r in range(20) for i, t in enumerate(texts)])
    return path


@pytest.fixture(scope="session")
def big_prepared(big_corpus, tmp_path_factory) -> Path:
    """The big corpus prepared without interruption (2 workers): ~5.6 MB of shards in ~90 files."""
    from distclm.cli import main

    out = tmp_path_factory.mktemp("bigprep") / "prepared"
    assert main(["prepare", f"--data.source={big_corpus}", *BIG_ARGS, "--data.num_workers=2",
                 f"--data.dir={out}"]) == 0
    return out


@pytest.fixture(scope="session")
def pydoc_blocks(tmp_path_factory) -> Path:
    """The embedded pydoc corpus prepared in 64-token blocks (~1,900 train blocks): the training tests' data."""
    out = tmp_path_factory.mktemp("pydoc64")
    run_cli("prepare", "--data.source=pydoc", f"--data.dir={out}", "--data.block_size=64", "--data.val_fraction=0.1",
            check=True)
    return out


# ---------------------------------------------------------------------------------------------
# Training runs read by several tests, by name (their table: tests/support/runs.py SHARED)

@pytest.fixture(scope="session")
def dropout_gpt2(tmp_path_factory) -> Path:
    """gpt2-tiny's shape with GPT-2's default dropout 0.1 (as DistilGPT2 has), saved as a Hugging Face folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from distclm.data.tokenize import load_hf_tokenizer

    out = tmp_path_factory.mktemp("dropout-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4)).save_pretrained(out)
    load_hf_tokenizer("gpt2")[0].save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def shared(tmp_path_factory, pydoc_blocks, dropout_gpt2) -> SharedRuns:
    return SharedRuns(tmp_path_factory.mktemp("shared-runs"), pydoc_blocks, SHARED, dropout_gpt2=dropout_gpt2)
