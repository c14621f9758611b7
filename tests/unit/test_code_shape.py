"""The shape the code promises (README "Architecture"): one door to accelerate/DeepSpeed, short functions and
modules, nothing GPT-2-specific outside GPT-2-specific code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "distclm"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def imported_modules(path: Path, top: bool = True) -> set[str]:
    """Modules `path` imports, anywhere in it (`top`: only the first component of each name)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n.split(".")[0] for n in names} if top else names


def test_only_the_engine_imports_accelerate_or_deepspeed():
    importers = {p.name for p in SOURCES if imported_modules(p) & {"accelerate", "deepspeed"}}
    assert importers == {"engine.py"}


def test_pure_parts_import_no_torch_distributed():
    for name in ("ds_config.py", "optim.py", "model.py", "atomic.py", "export.py"):
        assert not any(m.startswith("torch.distributed") for m in imported_modules(PACKAGE / name, top=False)), name


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_fit_a_screen_and_modules_stay_small(path):
    source = path.read_text()
    assert len(source.splitlines()) <= 400, f"{path.name}: {len(source.splitlines())} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{path.name}:{node.lineno} {node.name} is {length} lines"


def test_no_gpt2_attribute_names_or_token_ids_outside_its_preset():
    """Code (not comments or prose) reads sizes through ModelShape and special ids from the tokenizer."""
    import io
    import tokenize

    words = {"n_positions", "n_embd", "n_layer", "n_head", "50256"}
    for path in SOURCES:
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            used = tok.string.strip("'\"") if tok.type == tokenize.STRING else tok.string
            if tok.type in (tokenize.NAME, tokenize.NUMBER, tokenize.STRING) and used in words:
                gpt2_code = (path.name == "model.py" and "gpt2" in tok.line) or \
                    (path.name == "tokenize.py" and tok.string == "50256")  # the vendored tokenizer's record
                assert gpt2_code, f"{path.name}:{tok.start[0]}: {tok.line}"
