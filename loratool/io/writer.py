"""Write safetensors checkpoints of torch tensors atomically, streaming one tensor at a time
(the layout, staging and shards are ``io.shards``; this adds the tensors' bytes).

Tensors go to a temporary folder beside the target; shards are cut at a size limit and named
as transformers names them (``model-00001-of-00003.safetensors`` and
``model.safetensors.index.json``, or a single ``model.safetensors``). Only when everything is
written is the folder renamed into place; any exception or Ctrl-C removes it, so a failed run
leaves no partial output and never touches an input.

Example::
    with CheckpointWriter(Path("out"), inputs=[base], copy_from=base) as w:
        for name in names:
            w.add(name, tensor)
"""

from __future__ import annotations

import torch

from ..io.shards import ShardWriter, copy_config_files
from ..io.tensors import dtype_code, tensor_bytes
from ..units import parse_size

__all__ = ["CheckpointWriter", "copy_config_files", "parse_size"]


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    t = tensor.detach()
    return (t.cpu() if t.device.type != "cpu" else t).contiguous()


class CheckpointWriter(ShardWriter):
    """A :class:`ShardWriter` that takes torch tensors."""

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; a new shard starts when this one would pass the size limit."""
        t = _cpu(tensor)
        self.add_bytes(name, dtype_code(t.dtype), tuple(t.shape), tensor_bytes(t))

    def add_side(self, filename: str, name: str, tensor: torch.Tensor) -> None:
        """Stream a tensor into a second safetensors file of the output (``filename``), such as
        the record unmerge needs; it appears only when it receives a tensor."""
        t = _cpu(tensor)
        self.add_side_bytes(filename, name, dtype_code(t.dtype), tuple(t.shape),
                            tensor_bytes(t))
