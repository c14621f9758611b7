"""The shape the code promises (README "Architecture"): one door to accelerate/DeepSpeed, no import circle,
short functions and modules, nothing GPT-2-specific outside GPT-2-specific code."""

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


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_only_the_engine_package_imports_accelerate_or_deepspeed():
    """accelerate and DeepSpeed are imported under distclm/engine/ only, plus accelerate's tracking module where the
    trackers are built (trackers.py)."""
    outside = {}
    for path in SOURCES:
        if path.parent.name == "engine":
            continue
        names = {n for n in imported_modules(path, top=False) if n.split(".")[0] in ("accelerate", "deepspeed")}
        if path.name == "trackers.py":
            names -= {"accelerate", "accelerate.tracking"}  # `from accelerate import tracking`
        if names:
            outside[module_name(path)] = sorted(names)
    assert outside == {}
    inside = {module_name(p) for p in SOURCES if p.parent.name == "engine"
              and imported_modules(p) & {"accelerate", "deepspeed"}}
    assert inside == {"distclm.engine.core", "distclm.engine.probe", "distclm.engine.zero_files"}


def internal_imports(path: Path, modules: set[str]) -> set[str]:
    """distclm modules that `path` imports, at the top or inside a function (both are edges of a circle)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("distclm"):
            out |= {node.module} & modules
            out |= {f"{node.module}.{a.name}" for a in node.names} & modules  # `from distclm import dist`
    return out - {module_name(path), "distclm"}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each a circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle_inside_the_package():
    modules = {module_name(p): p for p in SOURCES}
    graph = {name: internal_imports(path, set(modules)) for name, path in modules.items()}
    assert graph["distclm.launch_checks"] >= {"distclm.dist"}  # the check sees edges (no vacuous pass)
    assert import_circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pure_parts_import_no_torch_distributed():
    for name in ("ds_config.py", "optim.py", "model.py", "atomic.py", "hf_folder.py", "export.py"):
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
