"""The run directory: which one (rank 0 names it, every rank takes its choice), whether this run may use
it, and what it holds.

    RUN/config.yaml          the resolved config          RUN/metrics.jsonl     one record per logged step / eval
    RUN/ds_config.json       resolved DeepSpeed config    RUN/summary.json      wall time, tokens, final loss
    RUN/checkpoints/step-N/  COMPLETE marker last         RUN/curves.png        loss and tokens/s against step
    RUN/export/              Hugging Face folder          RUN/block_ids-rank{R}.txt   with --log.block_ids=true
    RUN/export/README.md     the model card               RUN/launch.json       the card's command, world, hardware
    RUN/distclm-owner.json   marks a run dir (ownership)  RUN/distclm.lock      held while a job trains (runlock.py)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from distclm import model_card
from distclm.atomic import atomic_write
from distclm.config import Config, to_yaml
from distclm.errors import UserError, first_line
from distclm.ownership import check_claimable, claim_dir
from distclm.runlock import LOCK_FILES, RunLock

VERIFIED = "data-verified.json"  # the data fingerprints whose checksums this run dir has verified
# Settings that make a run what it is: a run dir that holds other values is another run.
IDENTITY_FIELDS = ("model.name", "data.dir", "train.lr", "train.weight_decay", "train.schedule",
                   "train.warmup_steps", "train.epochs", "train.max_steps", "train.seed", "train.max_grad_norm")


@dataclass(frozen=True)
class RunDir:
    path: Path
    lock: RunLock | None = field(default=None, compare=False)  # rank 0's, held while the job trains

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def export(self) -> Path:
        return self.path / "export"

    def block_ids(self, rank: int) -> Path:
        return self.path / f"block_ids-rank{rank}.txt"


def default_run_dir(cfg: Config) -> str:
    model = Path(cfg.model.name.rstrip("/")).name
    return str(Path("runs") / f"{model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def claim_run_dir(cfg: Config, engine, data_fingerprints: list[str]) -> RunDir:
    """Agree on the run dir, take its lock (rank 0; every rank takes its verdict), refuse one of another
    configuration, write config.yaml (and ds_config.json, and which data it verified), then run the launch checks
    (ranks, topology, the folder shared by every node). `cfg` is not changed. On a refusal the lock is let go."""
    from distclm.launch_checks import check_launch

    path = Path(engine.broadcast(cfg.run.dir or default_run_dir(cfg)))
    lock, verdict = None, None
    if engine.is_main:
        try:
            lock = take_run_dir(path)
        except UserError as exc:
            verdict = str(exc)
        except Exception as exc:  # rank 0's own traceback follows; the others stop with its headline
            engine.broadcast(f"rank 0 could not take --run.dir={path}: {first_line(exc)}")
            raise
    verdict = engine.broadcast(verdict)
    if verdict:
        raise UserError(verdict)
    run = RunDir(path, lock)
    try:
        check_same_configuration(run.path, cfg)
        if engine.is_main:
            resolved = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run.path)))
            atomic_write(run.path / "config.yaml", to_yaml(resolved).encode())
            if engine.ds_config is not None:
                atomic_write(run.path / "ds_config.json", (json.dumps(engine.ds_config, indent=2) + "\n").encode())
            atomic_write(run.path / VERIFIED, (json.dumps({"fingerprints": data_fingerprints}) + "\n").encode())
            model_card.record_launch(run.path, engine)  # RUN/launch.json: the card's command, world, hardware
        engine.barrier()
        check_launch(run.path)
    except BaseException:
        run.release()
        raise
    return run


def check_run_dir(cfg: Config) -> None:
    """Before any process group, on every rank (reads only): a --run.dir that is neither new, empty nor a run dir of
    distclm's is refused at no cost. claim_run_dir checks it again under the lock."""
    if cfg.run.dir:
        check_claimable(Path(cfg.run.dir), "run", "--run.dir", ignore=LOCK_FILES)


def take_run_dir(path: Path) -> RunLock:
    """Refuse a folder that is not a run dir of distclm's (nothing is written into it then), take its lock, and
    mark it as a run dir. -> the lock (the caller releases it)."""
    check_claimable(path, "run", "--run.dir", ignore=LOCK_FILES)  # a lock alone: a job taking a new dir right now
    path.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(path, say=lambda line: print(line, flush=True))
    try:
        claim_dir(path, "run", "--run.dir", ignore=LOCK_FILES)
    except BaseException:
        lock.release()
        raise
    return lock


def check_same_configuration(run_dir: Path, cfg: Config) -> None:
    """Refuse a run dir whose config.yaml holds another configuration, unless --run.overwrite."""
    import yaml

    path = run_dir / "config.yaml"
    if cfg.run.overwrite or not path.exists():
        return
    old, new, defaults = yaml.safe_load(path.read_text(encoding="utf-8")) or {}, cfg.to_dict(), Config().to_dict()

    def value(tree: dict, key: str):  # a key missing from an older config.yaml had its default
        section, name = key.split(".")
        return (tree.get(section) or {}).get(name, defaults[section][name])

    differ = [k for k in IDENTITY_FIELDS if value(old, k) != value(new, k)]
    if differ:
        raise UserError(f"--run.dir={run_dir} holds another configuration (differs in: "
                        f"{', '.join(f'--{k}' for k in differ)}); use another --run.dir, or --run.overwrite=true")


def open_data(cfg: Config, shape, verify: bool = True) -> tuple[list, list[float]]:
    """The prepared folder(s) of --data.dir, checked against the model (`shape`) and each other -> (readers, mixture
    weights). `verify`: checksums verified the first time a run dir uses a folder (training); eval trusts them."""
    from distclm.data import mixture
    from distclm.data.blocks import BlockReader
    from distclm.model import check_data_fits, check_same_tokenizer

    readers = open_data_verified(cfg) if verify else [BlockReader(d) for d in data_dirs(cfg)]
    ws = mixture.weights(cfg, len(readers))
    mixture.check_same_tokens(readers)
    for reader in readers:
        check_data_fits(shape, reader, f"--model.name={cfg.model.name}")
        check_same_tokenizer(cfg.model.name, reader, cfg.data.allow_tokenizer_mismatch)
    return readers, ws


def open_data_verified(cfg: Config):
    """Open the prepared folder(s); checksums are verified the first time a run dir uses them (on every rank,
    before any process group, so a bad shard stops every rank alike). The run dir remembers them
    (RUN/data-verified.json, written when the run dir is claimed)."""
    from distclm.data.blocks import BlockReader

    marker = Path(cfg.run.dir) / VERIFIED if cfg.run.dir else None
    known = json.loads(marker.read_text()).get("fingerprints", []) if marker is not None and marker.exists() else []
    readers = []
    for folder in data_dirs(cfg):
        reader = BlockReader(folder)
        readers.append(reader if reader.manifest["source"].get("fingerprint") in known else
                       BlockReader(folder, verify=True))
    return readers


def data_dirs(cfg: Config) -> list[str]:
    """--data.dir as a list: one prepared folder, or a comma list of them (a weighted mixture)."""
    if not cfg.data.dir:
        raise UserError("--data.dir is required: a folder made by `distclm prepare` (or a comma list of them)")
    return [d.strip() for d in str(cfg.data.dir).split(",") if d.strip()]
