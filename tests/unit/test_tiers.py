"""The tiers stay what tests/README.md says: `make test-fast` (-m "not slow and not extended") holds no test that
starts several processes. tests/dist and tests/multinode are slow by folder (tests/conftest.py); in the other
folders a test that starts several processes carries `@pytest.mark.slow` itself. Read statically from the source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import SLOW_FOLDERS

TESTS = Path(__file__).resolve().parents[1]
FAST_FOLDERS = ("unit", "e2e", "deploy")
# How a test here starts more than one process: run_cli(..., nproc=N), torchrun's module, `distclm run`'s flag.
SEVERAL_PROCESSES = re.compile(r"\bnproc=[2-9]|--nproc_per_node|torch\.distributed\.run|--run\.nproc=[2-9]")


def is_slow(node: ast.AST) -> bool:
    return any("mark.slow" in ast.unparse(d) for d in getattr(node, "decorator_list", []))


def multi_process_tests(path: Path) -> dict[str, bool]:
    """test name -> marked slow, for each test function of `path` whose body starts several processes."""
    source = path.read_text()
    tree = ast.parse(source)
    module_slow = any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in n.targets)
                      and "mark.slow" in ast.unparse(n.value) for n in tree.body)
    return {fn.name: module_slow or is_slow(fn) for fn in tree.body
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")
            and SEVERAL_PROCESSES.search(ast.get_source_segment(source, fn))}


def test_every_multi_process_test_outside_the_slow_folders_is_marked_slow():
    found = {f"{p.relative_to(TESTS)}::{name}": slow for folder in FAST_FOLDERS
             for p in sorted((TESTS / folder).glob("test_*.py")) for name, slow in multi_process_tests(p).items()}
    # the detector sees the two known ones (so an empty result cannot pass for the wrong reason)
    assert {"e2e/test_generate.py::test_run_demo_prepares_trains_evaluates_exports_and_samples",
            "deploy/test_packaging.py::test_wheel_in_a_fresh_venv_trains_zero2_on_two_processes"} <= set(found)
    assert [name for name, slow in found.items() if not slow] == []


def test_the_slow_folders_exist_and_the_fast_ones_are_not_among_them():
    assert all((TESTS / folder).is_dir() for folder in SLOW_FOLDERS)
    assert not set(SLOW_FOLDERS) & set(FAST_FOLDERS)
