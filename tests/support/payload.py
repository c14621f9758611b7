"""A pickle that runs code when loaded: its `__reduce__` writes a marker file (issue 28, rule 2's tests). The
marker's absence afterwards proves that nothing ran."""

from __future__ import annotations

import pickle
from pathlib import Path


class WritesMarker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def plant(path: Path, marker: Path, bare: bool = False) -> Path:
    """Replace `path` by the payload: a torch.save archive (the format of every checkpoint file), or a bare pickle."""
    import torch

    path.unlink(missing_ok=True)
    if bare:
        path.write_bytes(pickle.dumps(WritesMarker(marker)))
    else:
        torch.save({"state": WritesMarker(marker)}, path)
    return path
