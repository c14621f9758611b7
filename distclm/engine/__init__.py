"""The ONE package that imports accelerate and deepspeed (trackers.py: accelerate's tracking module too).

    core.py        Engine: the process group, DDP or ZeRO around the model, one optimizer step, state I/O
    zero_files.py  DeepSpeed's checkpoint files offline: universal conversion, lazy fp32 weights, the op table
    probe.py       one rank's footprint on this host (`python -m distclm.engine.probe`, for distclm plan)
"""

from distclm.engine.core import Engine, full_numel, offline
from distclm.engine.zero_files import deepspeed_ops, to_universal, zero_shards_state_dict

__all__ = ["Engine", "deepspeed_ops", "full_numel", "offline", "to_universal", "zero_shards_state_dict"]
