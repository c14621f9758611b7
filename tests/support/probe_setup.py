"""Run under torchrun by the tests: distclm's train set-up (plan + engine) and nothing else, then report what
this rank holds. Writes $DISTCLM_PROBE_OUT/rank-{R}.json:

    {"rank", "local", "total", "largest", "master_copy"}: parameter elements materialised on this rank right after
    set-up (partitions + anything gathered or persistent), the model's total, its largest parameter, and the
    elements of ZeRO's fp32 master partition held in memory of their own (not shared with the weights).

    python -m torch.distributed.run --nproc_per_node 2 tests/support/probe_setup.py --data.dir=D --model.name=M ...
"""

import json
import os
import sys
from pathlib import Path

from distclm import dist
from distclm.cli import parse
from distclm.engine import full_numel
from distclm.train import build_engine, make_plan

cfg = parse(["train", *sys.argv[1:]]).cfg
engine = build_engine(cfg, make_plan(cfg))
params = list(engine.module.parameters())
local = sum(p.data.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0) for p in params)
total = sum(full_numel(p) for p in params)
largest = max(full_numel(p) for p in params)
zero = getattr(engine.model, "optimizer", None)
masters = getattr(zero, "single_partition_of_fp32_groups", None) or getattr(zero, "fp32_partitioned_groups_flat", [])
weights = {t.untyped_storage().data_ptr() for p in params for t in (p.data, getattr(p, "ds_tensor", p.data))}
master_copy = sum(m.numel() for m in masters if m.untyped_storage().data_ptr() not in weights)
out = Path(os.environ["DISTCLM_PROBE_OUT"]) / f"rank-{dist.rank()}.json"
out.write_text(json.dumps({"rank": dist.rank(), "local": local, "total": total, "largest": largest,
                           "master_copy": master_copy}))
engine.close()
