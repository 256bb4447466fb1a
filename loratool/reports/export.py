"""What ``export`` reports: the ONNX graph written (its inputs, outputs, opset and files), how
the adapters went in (merged in memory, merged into the streamed weights, or as LoRA inputs
with one onnxruntime adapter file each), how it was verified, the KV-cache graphs
(``--with-past``); and its text. ``export.json`` beside the graph holds the same report.

Example::

    report = loratool.export("base/", ["adapter/"], "onnx/")
    report.opset, report.verification.max_abs_diff
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from .base import Report, optional


@dataclass
class Verification:
    """The graph in onnxruntime against PyTorch on random batches; ``checked`` alone (False)
    with ``--no-verify``."""

    checked: bool
    shapes: list[list[int]] | None = optional()  # [batch, sequence] of each batch checked
    max_abs_diff: float | None = optional()  # over the positions the mask keeps
    atol: float | None = optional()
    ok: bool | None = optional()
    # --stream: "whole model", or the words for the first-layers copy that was checked
    mode: str | None = optional()

    def lines(self) -> list[str]:
        """The verification's lines of the text."""
        if not self.checked:
            lines = ["  not verified (--no-verify)"]
        else:
            lines = [f"  verified in onnxruntime on shapes {self.shapes} (one padded): max "
                     f"|ONNX − PyTorch| {self.max_abs_diff:.3g} ≤ {self.atol:g}"]
        return lines + mode_lines(self.mode)


@dataclass
class Switch:
    """One run of the switching session: an adapter active (None: none, the base)."""

    adapter: str | None
    max_abs_diff: float


@dataclass
class SwitchVerification:
    """``--adapters-as-inputs``: one onnxruntime session switching adapters per run, each
    against transformers' model with that adapter merged."""

    checked: bool
    ok: bool
    atol: float
    switches: list[Switch]  # the base first, then each adapter in order
    max_abs_diff: float
    mode: str  # "whole model", or the words for the first-layers copy that was checked

    def lines(self) -> list[str]:
        """The verification's lines of the text."""
        return [f"  verified in one onnxruntime session, switching adapters per run: max "
                f"|ONNX − PyTorch (merged)| {self.max_abs_diff:.3g} ≤ {self.atol:g} over the "
                f"base and {len(self.switches) - 1} adapter(s)"] + mode_lines(self.mode)


def mode_lines(mode: str | None) -> list[str]:
    """A line when verification ran on a copy of the first layers, not the whole model."""
    return [] if mode is None or mode == "whole model" else [f"  checked on {mode}"]


@dataclass
class PastVerification:
    """A prefill and one decode step in onnxruntime against PyTorch's logits for the whole
    sequence; ``checked`` alone (False) with ``--no-verify``."""

    checked: bool
    max_abs_diff: float | None = optional()
    atol: float | None = optional()
    ok: bool | None = optional()


@dataclass
class WithPast:
    """``--with-past``: prefill and decode graphs over a KV cache."""

    graphs: list[str]  # prefill.onnx, decode.onnx
    past_inputs: list[str]  # past.{layer}.key / .value, decode's inputs
    present_outputs: list[str]  # present.{layer}.key / .value, both graphs' outputs
    verification: PastVerification


@dataclass
class Streamed:
    """``--stream``: the graph traced without weights and its initializers written one by
    one."""

    initializers: int
    changed: int  # initializers an adapter changed
    bytes: int  # of model.onnx.data
    lora_inputs: list[str]  # graph inputs for LoRA factors (none in a merged export)


@dataclass
class StreamedInputs:
    """The streamed base graph of ``--adapters-as-inputs``."""

    initializers: int
    changed: int
    bytes: int
    lora_inputs: int  # how many LoRA factors are graph inputs


@dataclass
class LoraInputs:
    """The LoRA branch the swappable graph has: on which modules, at which rank."""

    modules: int
    rank: int  # the largest rank among the adapters; smaller ones are zero-padded
    # modules an adapter targets that the output does not depend on (no inputs for them)
    outside_the_graph: list[str]


@dataclass
class ExportReport(Report):
    """An ONNX export: what every kind has. The report is a :class:`MergedExportReport` or,
    with ``adapters_as_inputs``, an :class:`AdapterInputsExportReport`."""

    base: str
    adapters: list[str]
    weights: list[float]
    task: str  # "causal-lm" or "feature-extraction"
    architecture: str | None
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, int]
    dtype: str
    opset: int | None  # read from the written graph

    # the report's keys that export.json leaves out
    NOT_SAVED: ClassVar[tuple[str, ...]] = ("output", "seconds")

    def head(self, output: str, files: list[str], how: str, seconds: float) -> list[str]:
        """The first two lines: what was written, the graph, how the adapters went in."""
        return [f"wrote {output}: {', '.join(files)}",
                f"  {self.architecture} ({self.task}, {self.dtype}, opset {self.opset}), "
                f"inputs {', '.join(self.inputs)}; {how}; {seconds:.1f} s"]

    def saved(self) -> str:
        """``export.json``: the report as written beside the graph."""
        saved = {k: v for k, v in self.to_dict().items() if k not in self.NOT_SAVED}
        return json.dumps(saved, indent=2) + "\n"



@dataclass
class MergedExportReport(ExportReport):
    """The adapters merged into the graph's weights: in memory, or tensor by tensor into the
    streamed weights (``--stream``)."""

    tensors_changed_by_adapters: int
    verification: Verification
    with_past: WithPast | None
    not_copied: list[str]  # files of the base left out (its weights in other formats)
    streamed: Streamed | None
    files: list[str]  # the output folder's files (in export.json: those before it)
    output: str
    seconds: float

    def render(self) -> str:
        where = "into the streamed weights" if self.streamed else "in memory"
        how = (f"{len(self.adapters)} adapter(s) merged {where} "
               f"({self.tensors_changed_by_adapters} tensors)")
        lines = self.head(self.output, self.files, how, self.seconds)
        lines += self.verification.lines()
        past = self.with_past
        if past and past.verification.checked:
            lines.append(f"  prefill.onnx + decode.onnx (KV cache): a prefill and one decode "
                         f"step match PyTorch's full-sequence logits to "
                         f"{past.verification.max_abs_diff:.3g}")
        return "\n".join(lines)


@dataclass
class AdapterInputsExportReport(ExportReport):
    """``--adapters-as-inputs``: the base graph with LoRA factors as inputs, and one
    onnxruntime adapter file per adapter that a session switches per run."""

    adapter_files: list[str]  # adapters/NAME.onnx_adapter, one per adapter in order
    lora: LoraInputs
    verification: SwitchVerification | Verification  # Verification: not checked
    streamed: StreamedInputs
    tensors_changed_by_adapters: int  # 0: nothing is merged
    with_past: None
    not_copied: list[str]
    files: list[str]
    output: str
    seconds: float

    NOT_SAVED: ClassVar[tuple[str, ...]] = ("files", "output", "seconds")

    def render(self) -> str:
        how = (f"LoRA inputs on {self.lora.modules} modules (rank {self.lora.rank}), "
               f"adapters: {', '.join(self.adapter_files)}")
        lines = self.head(self.output, self.files, how, self.seconds)
        if self.lora.outside_the_graph:
            lines.append(f"  not in the graph (the output does not depend on them): "
                         f"{', '.join(self.lora.outside_the_graph)}")
        return "\n".join(lines + self.verification.lines())
