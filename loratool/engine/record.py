"""What a merge records beside its output so that unmerge gives the base back: the base
tensors that full tensors (``modules_to_save``) replaced, as ``replaced.<name>``, and DoRA's
row norms ‖V‖, as ``dora_norm.<name>``; neither can be recovered from the merged weights.

Example::
    record = UnmergeRecord(open_checkpoint("merged/"))
    record.load("replaced", "lm_head.weight")          # None when not recorded
"""

from __future__ import annotations

import torch

from ..errors import HubError
from ..headers.checkpoint import Checkpoint
from ..headers.sources import SIDE_FILES
from ..io.tensors import open_checkpoint

RECORD, LEGACY_DORA_RECORD = SIDE_FILES  # the second: loratool 0.1's, DoRA norms only


class UnmergeRecord:
    """The record a merged model carries for unmerge (see ``RECORD``); empty when absent."""

    def __init__(self, merged: Checkpoint) -> None:
        self.files: list[tuple[Checkpoint, str]] = []
        for filename, prefix in ((RECORD, ""), (LEGACY_DORA_RECORD, "dora_norm.")):
            try:
                path = merged.extra_file(filename)
            except HubError:
                path = None  # not on the Hub, or offline: as if absent
            if path is not None:
                self.files.append((open_checkpoint(path), prefix))

    def _find(self, kind: str, name: str) -> tuple[Checkpoint, str] | None:
        for ckpt, prefix in self.files:
            key = f"{kind}.{name}" if not prefix else (name if prefix == kind + "." else None)
            if key is not None and key in ckpt.tensors:
                return ckpt, key
        return None

    def shape(self, kind: str, name: str) -> tuple[int, ...] | None:
        """The recorded tensor's shape, or None."""
        hit = self._find(kind, name)
        return None if hit is None else hit[0].info(hit[1]).shape

    def load(self, kind: str, name: str, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The recorded tensor, or None."""
        hit = self._find(kind, name)
        return None if hit is None else hit[0].load(hit[1], device=device, dtype=dtype)
