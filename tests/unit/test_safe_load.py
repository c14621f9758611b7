"""safe_load (issue 28, rule 2): an Enum member pickled by name, as getattr(ZeroStageEnum, "gradients") (how
Debian bookworm's Python 3.11.2 in the image pickles DeepSpeed's ZeroStageEnum), loads under forced weights-only;
a getattr that reaches anything else is refused with one line naming the file, and runs nothing."""

from __future__ import annotations

import pytest
import torch

from distclm.engine.zero_files import allow_deepspeed_types
from distclm.errors import UserError
from distclm.safe_load import refuse_code, refusing_code, weights_only_loads


class ByName:
    """Pickles as getattr(owner, name): the by-name form, whatever this Python does for an Enum itself."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def saved(tmp_path, value, name="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
    path = tmp_path / name
    torch.save({"optimizer_state_dict": {"zero_stage": value, "loss": torch.ones(2)}}, path)
    return path


def test_an_enum_member_pickled_by_name_loads_weights_only(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = saved(tmp_path, ByName(ZeroStageEnum, "gradients"))
    allow_deepspeed_types()
    refuse_code(tmp_path)  # the scan lets it through: the load decides what the getattr may return
    with weights_only_loads(), refusing_code(tmp_path):
        state = torch.load(path, weights_only=False)  # forced weights-only, as DeepSpeed's own call is
    assert state["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.gradients


@pytest.mark.parametrize("reach", ["attribute of an allow-listed Enum", "allow-listed class, not an Enum"])
def test_a_getattr_beyond_enum_members_is_refused_and_runs_nothing(tmp_path, reach):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    owner, name = (ZeroStageEnum, "__class__") if reach.startswith("attribute") else (LossScaler, "__init__")
    path = saved(tmp_path, ByName(owner, name))
    allow_deepspeed_types()
    with pytest.raises(UserError) as exc, weights_only_loads(), refusing_code(tmp_path):
        torch.load(path, weights_only=False)
    line = str(exc.value)
    assert "\n" not in line and f"refusing to load {path}: " in line, line
    assert f"getattr({owner.__qualname__}, {name!r}) is not a member of an allow-listed Enum" in line, line
