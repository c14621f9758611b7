"""launchers/: the shell launchers turn their settings into the right launcher command line around one and
the same distclm command line (dry runs; the real multi-node runs are in tests/multinode/), Slurm starts one
torchrun per node, and the accelerate configs carry topology only."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distclm.cli import parse
from tests.support.env import child_env

REPO = Path(__file__).resolve().parents[2]
L = REPO / "launchers"
TRAIN = ["train", "--data.dir=/shared/data", "--model.name=distilgpt2", "--run.dir=/shared/runs/r",
         "--train.strategy=zero2", "--gen.prompt=two words"]


def dry(script: str, args: list[str], path_prefix: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    full = {"PATH": (f"{path_prefix}:" if path_prefix else "") + "/usr/bin:/bin", "DISTCLM_DRY_RUN": "1", **env}
    return subprocess.run(["bash", str(L / script), *args], env=full, capture_output=True, text=True, timeout=30)


def launched(out: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(options, all words, the distclm arguments) of a printed launcher command."""
    words = shlex.split(out)
    cut = words.index("distclm.cli")
    return dict(zip(words, words[1:])), words, words[cut + 1:]


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh", "slurm.sbatch"])
def test_scripts_are_valid_bash_and_executable(script):
    assert subprocess.run(["bash", "-n", str(L / script)]).returncode == 0
    if script.endswith(".sh"):
        assert os.stat(L / script).st_mode & stat.S_IXUSR


def test_torchrun_one_node_is_standalone():
    proc = dry("torchrun.sh", TRAIN, NPROC_PER_NODE="4")
    assert proc.returncode == 0, proc.stderr
    opts, words, args = launched(proc.stdout)
    assert "--standalone" in words and opts["--nproc-per-node"] == "4" and opts["--max-restarts"] == "3"
    assert args == TRAIN and parse(args).cfg.gen.prompt == "two words"


def test_torchrun_multi_node_c10d_with_a_raisable_join_timeout():
    proc = dry("torchrun.sh", TRAIN, NNODES="4", NPROC_PER_NODE="8", RDZV_ENDPOINT="node0:29500", RDZV_ID="job7",
               RDZV_TIMEOUT="1800", MAX_RESTARTS="5", LOCAL_ADDR="10.0.0.2")
    assert proc.returncode == 0, proc.stderr
    opts, words, args = launched(proc.stdout)
    assert (opts["--nnodes"], opts["--rdzv-backend"], opts["--rdzv-endpoint"], opts["--rdzv-id"]) == \
        ("4", "c10d", "node0:29500", "job7")
    assert "join_timeout=1800" in opts["--rdzv-conf"] and "read_timeout=1800" in opts["--rdzv-conf"]
    assert opts["--max-restarts"] == "5" and opts["--local-addr"] == "10.0.0.2"
    assert "--standalone" not in words and args == TRAIN


def test_torchrun_reads_the_kubeflow_operator_variables():
    proc = dry("torchrun.sh", TRAIN, PET_NNODES="2:4", PET_NPROC_PER_NODE="8", PET_RDZV_ENDPOINT="job-master-0:29400",
               PET_RDZV_ID="job", PET_MAX_RESTARTS="7")
    opts, _, _ = launched(proc.stdout)
    assert (opts["--nnodes"], opts["--nproc-per-node"], opts["--rdzv-endpoint"], opts["--rdzv-id"],
            opts["--max-restarts"]) == ("2:4", "8", "job-master-0:29400", "job", "7")


def test_torchrun_hosts_the_endpoint_named_by_its_own_short_hostname():
    me = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    mine, _, _ = launched(dry("torchrun.sh", TRAIN, NNODES="2", RDZV_ENDPOINT=f"{me}.svc.local:29400").stdout)
    other, _, _ = launched(dry("torchrun.sh", TRAIN, NNODES="2", RDZV_ENDPOINT="elsewhere:29400").stdout)
    given, _, _ = launched(dry("torchrun.sh", TRAIN, NNODES="2", RDZV_ENDPOINT=f"{me}:1", RDZV_CONF="is_host=0").stdout)
    assert "is_host=1" in mine["--rdzv-conf"]
    assert "is_host" not in other["--rdzv-conf"]  # torchrun's own address check decides
    assert given["--rdzv-conf"].endswith("is_host=0")  # an explicit setting wins


def test_torchrun_multi_node_without_endpoint_is_refused():
    proc = dry("torchrun.sh", TRAIN, NNODES="2")
    assert proc.returncode == 2 and "RDZV_ENDPOINT" in proc.stderr


def test_deepspeed_no_ssh_with_node_rank(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=8\nb slots=8\n")
    proc = dry("deepspeed.sh", TRAIN, HOSTFILE=str(hostfile), MASTER_ADDR="a", NO_SSH="1", NODE_RANK="1")
    assert proc.returncode == 0, proc.stderr
    opts, words, args = launched(proc.stdout)
    assert words[1:3] == ["-m", "deepspeed.launcher.runner"] and "--no_ssh" in words
    assert (opts["--hostfile"], opts["--master_addr"], opts["--node_rank"], opts["--master_port"]) == \
        (str(hostfile), "a", "1", "29500")
    assert words[words.index("distclm.cli") - 1] == "--module" and args == TRAIN


def test_deepspeed_refuses_half_settings(tmp_path):
    assert "NODE_RANK" in dry("deepspeed.sh", TRAIN, NO_SSH="1").stderr
    hostfile = tmp_path / "h"
    hostfile.write_text("a slots=1\n")
    assert "MASTER_ADDR" in dry("deepspeed.sh", TRAIN, HOSTFILE=str(hostfile)).stderr
    assert "no such file" in dry("deepspeed.sh", TRAIN, HOSTFILE=str(tmp_path / "missing"), MASTER_ADDR="a").stderr


def test_hostfile_example_is_what_deepspeed_reads():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(L / "hostfile.example"))
    assert list(pool.items()) == [("node0.cluster", 8), ("node1.cluster", 8)]


def test_slurm_starts_one_torchrun_per_node(tmp_path):
    # Stand-ins for Slurm's tools: scontrol expands the node list; srun records its options and runs the
    # command once per node, as Slurm would on each of them.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nopts=()\nwhile [[ $1 == --* ]]; do opts+=(\"$1\"); shift; done\n"
        "echo \"srun ${opts[*]}\" >&2\nfor n in 0 1; do SLURM_NODEID=$n \"$@\"; done\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_SUBMIT_DIR": str(REPO)}
    proc = dry("slurm.sbatch", TRAIN, path_prefix=bin_dir, **env)
    assert proc.returncode == 0, proc.stderr
    assert "--kill-on-bad-exit=1" in proc.stderr and "--ntasks-per-node=1" in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]  # the same command line on every node
    opts, _, args = launched(lines[0])
    assert (opts["--nnodes"], opts["--nproc-per-node"], opts["--rdzv-endpoint"], opts["--rdzv-id"]) == \
        ("2", "8", "gpu-a:29500", "slurm-42")
    assert args == TRAIN
    text = (L / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text


ACCELERATE = sorted((L / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.name for p in ACCELERATE])
def test_accelerate_configs_carry_topology_only(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in ("NO", "MULTI_GPU")  # never DEEPSPEED / FSDP: --train.strategy decides
    assert not any(k.startswith(("deepspeed", "fsdp", "zero")) for k in cfg)
    assert cfg["num_processes"] >= cfg["num_machines"] >= 1
    if cfg["num_machines"] > 1:
        assert cfg["main_process_ip"] and cfg["main_process_port"] and cfg["rdzv_backend"] == "c10d"


def test_accelerate_covers_one_process_multi_gpu_and_multi_node():
    cfgs = {p.name: yaml.safe_load(p.read_text()) for p in ACCELERATE}
    assert cfgs["single_gpu.yaml"]["num_processes"] == 1
    assert cfgs["multi_gpu.yaml"]["num_machines"] == 1 and cfgs["multi_gpu.yaml"]["num_processes"] > 1
    assert cfgs["multi_node.yaml"]["num_machines"] > 1


def doc_commands(page: Path) -> list[list[str]]:
    """The distclm arguments of every complete command (no `...`) in the ```bash blocks of a documentation page."""
    blocks = page.read_text().split("```bash")[1:]
    found = []
    for block in blocks:
        for line in block.split("```")[0].replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or "..." in line:
                continue
            words = shlex.split(line)
            for marker in ("launchers/torchrun.sh", "launchers/deepspeed.sh", "launchers/slurm.sbatch", "distclm.cli",
                           "distclm"):
                if marker in words:
                    found.append(words[words.index(marker) + 1:])
                    break
    return found


def test_cluster_guide_commands_parse():
    commands = doc_commands(REPO / "docs/cluster.md")
    # doctor, one GPU (3), torchrun, deepspeed, Slurm (2): a guide that lost its examples fails here
    assert len(commands) >= 6, commands
    for argv in commands:
        assert parse(argv) is not None, argv


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))])
def test_every_documented_command_parses(page):
    for argv in doc_commands(REPO / page):
        assert parse(argv) is not None, (page, argv)


@pytest.mark.slow  # two training processes under torchrun, twice (one restart)
def test_torchrun_script_exits_with_the_workers_cause_not_torchruns_1(tmp_path):
    """torchrun exits 1 whatever its workers' codes; the script passes on theirs (distclm/exit_code.py): here a user
    error (2, which a podFailurePolicy turns into FailJob), on 2 real processes and after a restart."""
    env = {**child_env(), "NPROC_PER_NODE": "2", "MAX_RESTARTS": "1", "PYTHON": sys.executable,
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(L / "torchrun.sh"), "train", f"--data.dir={tmp_path / 'missing'}",
                           "--model.name=gpt2-tiny", f"--run.dir={tmp_path / 'run'}"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "distclm: error:" in proc.stderr and re.search(r"exitcode\s*:\s*2", proc.stderr)  # torchrun's own summary
    assert not list(tmp_path.glob("distclm-exit.*"))  # the script's folder of codes is gone
