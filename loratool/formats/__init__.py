"""Adapter formats: detection by content, and (per format) readers and writers.

``detect`` looks at tensor names, header metadata and configs, never at file names alone.
"""

from __future__ import annotations

from ..checkpoint import Checkpoint

ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B",
                   ".lora_down.", ".lora_up.", ".lora_a", ".lora_b")


def detect(ckpt: Checkpoint) -> tuple[str, str]:
    """``(kind, format)``: kind is ``model`` or ``adapter``; format names the layout.

    Example: ``detect(open_checkpoint("adapter/"))`` → ``("adapter", "peft")``.
    """
    names = list(ckpt.tensors)
    is_adapter = ckpt.adapter_config is not None or any(
        m in n for n in names for m in ADAPTER_MARKERS)
    if not is_adapter:
        return "model", ckpt.container
    if any(n.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for n in names):
        return "adapter", "kohya"
    if "lora_adapter_metadata" in ckpt.metadata or any(
            n.startswith(("unet.", "transformer.", "text_encoder.")) for n in names):
        return "adapter", "diffusers"
    return "adapter", "peft"
