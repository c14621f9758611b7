"""docker/: no Docker engine runs here, so the images are checked statically: every file a Dockerfile copies
exists (and survives .dockerignore), every distclm command it runs (RUN, ENTRYPOINT + CMD, and the `docker
run` examples in its header and in docs/cluster.md) is accepted by the CLI's own parser, and the image has what
DESIGN.md asks of it: CUDA base with the matching torch, DeepSpeed ops prebuilt, non-root, volumes."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest

from distclm.cli import parse

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cpu", "docker/Dockerfile.gpu"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def args_of(inst: str) -> list[str]:
    """Exec form (a JSON list) or shell form."""
    return json.loads(inst) if inst.startswith("[") else shlex.split(inst)


def distclm_commands(shell: str) -> list[list[str]]:
    """The `distclm ...` commands in a shell line, without redirections."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found, words = [], []
    for token in [*lexer, ";"]:
        if token in ("&&", "||", ";", "|", "&"):
            if words and words[0] == "distclm":
                cut = next((i for i, w in enumerate(words) if w in (">", ">>", "<", "2>")), len(words))
                found.append(words[1:cut])
            words = []
        else:
            words.append(token)
    return found


def docker_run_examples(text: str, image_pattern: str = r"distclm:[\w.-]+") -> list[list[str]]:
    """The distclm arguments of every `docker run ... IMAGE ARGS` example (comment or code block) in text."""
    found = []
    for chunk in re.split(r"\n(?!\s*-)", text.replace("\\\n", " ")):
        line = chunk.strip().lstrip("#").strip()
        if not line.startswith("docker run"):
            continue
        words = shlex.split(line)
        if "--entrypoint" in words:  # another program than distclm's CLI (e.g. bench/gpu.py)
            continue
        image = next(i for i, w in enumerate(words) if re.fullmatch(image_pattern, w))
        found.append(words[image + 1:])
    return found


def dockerignored(path: str) -> bool:
    ignore = REPO / ".dockerignore"
    if not ignore.exists():
        return False
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.rstrip("/") + "/*") for p in patterns)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_copied_file_exists_in_the_build_context(dockerfile):
    copies = [args_of(a) for kw, a in instructions(REPO / dockerfile) if kw in ("COPY", "ADD")]
    assert copies
    for words in copies:
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for src in sources:
            assert (REPO / src).exists(), f"{dockerfile}: COPY {src}: not in the repository"
            assert not dockerignored(src), f"{dockerfile}: COPY {src}: excluded by .dockerignore"
    copied = {Path(s).name for words in copies for s in words[:-1]}
    # What `pip install .` and the launchers need inside the image.
    assert {"pyproject.toml", "constraints.txt", "README.md", "distclm", "launchers"} <= copied  # templates: distclm/ds_configs


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_distclm_command_the_image_runs_parses(dockerfile):
    insts = instructions(REPO / dockerfile)
    commands = [c for kw, a in insts if kw == "RUN" for c in distclm_commands(a)]
    entry = [args_of(a) for kw, a in insts if kw == "ENTRYPOINT"][-1]
    cmd = [args_of(a) for kw, a in insts if kw == "CMD"][-1]
    assert entry == ["distclm"]
    commands.append(cmd)
    commands += docker_run_examples((REPO / dockerfile).read_text())
    assert len(commands) >= 3
    for argv in commands:
        inv = parse(argv)  # raises UserError on an unknown command, flag or value
        assert inv is not None, argv


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_non_root_user_and_volumes(dockerfile):
    insts = instructions(REPO / dockerfile)
    users = [a for kw, a in insts if kw == "USER"]
    assert users and users[-1] not in ("root", "0")
    volumes = [v for kw, a in insts if kw == "VOLUME" for v in args_of(a)]
    workdir = [a for kw, a in insts if kw == "WORKDIR"][-1]
    # The presets write data/... and runs/... relative to the working directory: both are volumes.
    assert {f"{workdir}/data", f"{workdir}/runs"} <= set(volumes)


def test_cuda_image_matches_torch_to_its_cuda_and_prebuilds_the_deepspeed_ops():
    text = (REPO / "docker/Dockerfile").read_text()
    insts = instructions(REPO / "docker/Dockerfile")
    args = dict(a.split("=", 1) for kw, a in insts if kw == "ARG" and "=" in a)
    base = [a for kw, a in insts if kw == "FROM"][0]
    assert base.startswith("nvidia/cuda:") and "devel" in base  # nvcc, to compile the ops
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert args["TORCH_CUDA"].strip('"') == f"cu{major}{minor}"
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in text
    pinned = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == pinned
    runs = " ".join(a for kw, a in insts if kw == "RUN")
    assert "DS_BUILD_CPU_ADAM=1" in runs and "DS_BUILD_FUSED_ADAM=1" in runs and "--no-build-isolation" in runs


def test_cpu_image_uses_the_cpu_torch_build():
    # torch's source is a build argument (docker/build.sh: a local wheel folder where the index is unreachable);
    # its default is PyTorch's CPU index.
    insts = instructions(REPO / "docker/Dockerfile.cpu")
    args = dict(a.split("=", 1) for kw, a in insts if kw == "ARG" and "=" in a)
    runs = " ".join(a for kw, a in insts if kw == "RUN")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "${TORCH_INDEX_URL}"' in runs and "${TORCH_FIND_LINKS:+" in runs
    assert "DS_BUILD_CPU_ADAM=1" in runs


def test_cluster_guide_docker_examples_parse():
    guide = (REPO / "docs/cluster.md").read_text()
    examples = docker_run_examples(guide)
    assert "docker build -f docker/Dockerfile " in guide and "docker build -f docker/Dockerfile.cpu " in guide
    assert len(examples) >= 3, examples  # doctor, the demo on the CUDA image, the demo on the CPU image
    for argv in examples:
        assert parse(argv) is not None, argv


def test_gpu_image_builds_from_the_cpu_images_base_with_pypis_cuda_torch_and_liger():
    # No NGC: the same Python base as the CPU image; PyPI's torch is the CUDA build; liger-kernel via [gpu].
    insts = instructions(REPO / "docker/Dockerfile.gpu")
    cpu_base = [a for kw, a in instructions(REPO / "docker/Dockerfile.cpu") if kw == "FROM"]
    assert [a for kw, a in insts if kw == "FROM"] == cpu_base
    args = dict(a.split("=", 1) for kw, a in insts if kw == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://pypi.org/simple"
    pinned = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert args["TORCH_VERSION"] == pinned
    runs = " ".join(a for kw, a in insts if kw == "RUN")
    assert '".[gpu]"' in runs and "DS_BUILD_CPU_ADAM=1" in runs and "import liger_kernel" in runs
    assert re.search(r"^liger-kernel==\S+$", (REPO / "constraints.txt").read_text(), re.M)
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("liger-kernel") for d in extras["gpu"])
