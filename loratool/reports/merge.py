"""What ``merge`` and ``unmerge`` report: a model folder's merge (safetensors), a GGUF merge
(each changed tensor's re-quantization error) and a pipeline's (one merge per component);
and their text.

Example::

    report = loratool.merge("base/", ["adapter/"], "merged/")
    report.tensors_changed, report.max_abs_delta
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import human_bytes
from .base import Report, optional
from .text import LAYER, listing, num, rate, table


@dataclass
class AdapterWeight:
    """An adapter and the weight its delta was taken with."""

    adapter: str
    weight: float


@dataclass
class MergedAdapter(AdapterWeight):
    """An adapter of a model-folder merge: what it holds."""

    modules: int = 0
    full_tensors: int = 0
    format: str = ""


@dataclass
class VerifyResult:
    """``--verify``: every changed tensor of the output against a float64 reference, the
    worst one (its error against the rounding bound)."""

    name: str | None
    ratio: float
    max_abs_error: float
    checked: int
    ok: bool


@dataclass
class ExactFixes:
    """The values unmerge cannot recompute exactly ((W + ΔW) − ΔW rounds to another value
    than W): merge records them (index and base value); unmerge puts them back."""

    values: int  # merge: recorded; unmerge: put back
    changed_values: int  # values of the tensors the adapters change
    bytes: int  # merge: their size in the record
    # merge: tensors no unmerge can undo (IA³ or BOFT scales with zeros); unmerge: tensors
    # whose recomputation differs from the merge's
    not_applied: list[str]


@dataclass
class QuantizedTensor:
    """``--qlora``: one tensor bitsandbytes quantized: ‖W‖, ‖Wq − W‖ (Wq its
    dequantize(quantize(W)): how far the faithful merge is from a plain one) and ‖ΔW‖ (what
    the adapters add; 0 where none changes it)."""

    name: str
    base_norm: float
    quant_error: float
    change: float


@dataclass
class QloraBase:
    """``--qlora``: the adapters were folded into bitsandbytes' dequantize(quantize(W)) of
    every tensor it quantized, as the model was trained."""

    settings: str  # in words: "nf4, blocks of 64, double quantization"
    quant_type: str  # nf4 or fp4
    blocksize: int
    double_quant: bool
    dtype: str | None  # the dtype the weights were quantized from (None: the base's own)
    compute_dtype: str | None  # the dtype the layers computed in (None: no cast)
    source: str  # "given", or the file the settings were read from
    tensors: int  # tensors quantized (all of them, changed by an adapter or not)
    changed: int  # of them, changed by an adapter
    kept: list[str]  # Linear modules bitsandbytes leaves unquantized (lm_head …)
    rel_base_error: float  # ‖Wq − W‖ / ‖W‖ over all quantized tensors
    error_vs_change: float | None  # ‖Wq − W‖ / ‖ΔW‖ over the changed ones
    per_tensor: list[QuantizedTensor]

    def lines(self) -> list[str]:
        """What the report's text says of it: settings, the distance, the worst tensors."""
        vs = (f"; {self.error_vs_change:.3g}× the adapters' own change ‖ΔW‖ on the tensors "
              "they change" if self.error_vs_change is not None else "")
        out = [f"  QLoRA base ({self.settings}; settings {self.source}): {self.tensors} "
               f"tensors bitsandbytes quantizes taken as dequantize(quantize(W)), "
               f"{self.changed} of them changed by the adapters; the faithful merge differs "
               f"from a plain one by ‖Wq − W‖/‖W‖ = {self.rel_base_error:.3g}{vs}"]
        if self.kept:
            out.append(f"  left in float as bitsandbytes leaves them: {listing(self.kept, 3)}")
        groups: dict[str, list[QuantizedTensor]] = {}
        for t in self.per_tensor:
            groups.setdefault(LAYER.sub("*", t.name), []).append(t)
        rows = [["tensor", "‖Wq − W‖/‖W‖", "‖Wq − W‖/‖ΔW‖"]]
        for name, ts in groups.items():
            rel = max(t.quant_error / t.base_norm if t.base_norm else 0.0 for t in ts)
            vs_change = [t.quant_error / t.change for t in ts if t.change > 0]
            rows.append([name + (f" ×{len(ts)}" if len(ts) > 1 else ""), num(rel),
                         num(max(vs_change)) if vs_change else "unchanged"])
        return out + [""] + ["  " + x for x in table(rows, right={1, 2})] + [
            "  (largest per group: above 1 in the last column, the quantization moved the "
            "base further than the adapter moves it)"]


@dataclass
class MergeReport(Report):
    """A merge (or unmerge) into a model folder or a single safetensors file."""

    operation: str  # "merge" or "unmerge"
    base: str
    adapters: list[MergedAdapter]
    output: str
    device: str
    dtype: str
    tensors: int
    tensors_changed: int
    max_abs_delta: float  # the largest single |w·s·ΔW| value added
    dora_norms_recorded: int
    replaced_recorded: int
    record: str | None  # the record file unmerge needs, or None
    not_copied: list[str]  # files of the base left out (its weights in other formats)
    seconds: float
    stream_seconds: float  # reading, merging and writing the tensors (what the bar shows)
    gb_per_s: float | None  # the stream's rate
    bytes: int
    peak_rss_mb: float | None
    inert_modules: list[str]  # modules that change nothing, left out
    peak_gpu_mb: float | None = optional()
    verify: VerifyResult | None = optional()
    exact: ExactFixes | None = optional()
    qlora: QloraBase | None = optional()

    def render(self) -> str:
        names = ", ".join(f"{a.adapter}×{a.weight:g}" for a in self.adapters)
        how = "into" if self.operation == "merge" else "from"
        return "\n".join([f"wrote {self.output}: {self.operation}d {names} {how} {self.base}"]
                         + self.detail())

    def detail(self) -> list[str]:
        """The lines under the first: what changed, what was recorded, verified."""
        lines = [f"  {self.tensors_changed} of {self.tensors} tensors changed, max |ΔW| "
                 f"{self.max_abs_delta:.3g}; {self.seconds:.2f} s, {rate(self.gb_per_s)} while "
                 f"streaming on {self.device}, peak RSS "
                 + (f"{self.peak_rss_mb:.0f} MiB" if self.peak_rss_mb is not None else "n/a")
                 + (f", peak GPU {self.peak_gpu_mb:.0f} MiB" if self.peak_gpu_mb is not None
                    else "")]
        kept = [f"{n} tensors replaced in full" for n in [self.replaced_recorded] if n] + [
            f"DoRA row norms of {n} tensors" for n in [self.dora_norms_recorded] if n]
        if kept:
            lines.append(f"  recorded {' and '.join(kept)} in {self.record}, so that unmerge "
                         "gives the base back")
        x = self.exact
        if x and self.operation == "merge":
            share = x.values / x.changed_values if x.changed_values else 0.0
            lines.append(f"  recorded {x.values:,} values ({share:.2%} of the changed tensors'"
                         f", {human_bytes(x.bytes)}) that unmerge's own arithmetic does not "
                         "give back ((W + ΔW) − ΔW, or a scaling or rotation undone), so that "
                         "unmerge is exact")
            if x.not_applied:
                lines.append(f"  note: {len(x.not_applied)} tensor(s) cannot be unmerged (a "
                             "scale with zeros multiplied those weights to 0): "
                             f"{listing(x.not_applied, 3)}")
        elif x:
            lines.append(f"  put back {x.values:,} values from the merge's record: the base "
                         "bit for bit" + (f"; not in {len(x.not_applied)} tensor(s) whose "
                                          f"unmerge differs from the merge's (other adapters, "
                                          f"weights, dtype or device): {listing(x.not_applied, 3)}"
                                          if x.not_applied else ""))
        lines += inert_lines(self.inert_modules)
        if self.not_copied:
            lines.append(f"  left out {len(self.not_copied)} file(s) of the base that hold its "
                         f"old weights in another format: {listing(self.not_copied)}")
        if self.qlora:
            lines += self.qlora.lines()
        v = self.verify
        if v:
            lines.append(f"  verify: {v.checked} changed tensors within the rounding bound; "
                         f"worst {v.name} at {v.ratio:.3f}× the bound (max error "
                         f"{v.max_abs_error:.3g})")
        return lines


def inert_lines(inert: list[str]) -> list[str]:
    """Modules left out of a merge because they change nothing."""
    if not inert:
        return []
    return [f"  {len(inert)} module(s) change nothing (rank 0, or a factor all zero) and were "
            f"left out: {listing(inert, 3)}"]


@dataclass
class GgufChange:
    """One changed tensor of a GGUF merge: its type in and out, and what re-quantizing cost
    against the exact float32 merge."""

    name: str
    type: str
    written_as: str
    rel_error: float  # ‖quantized − exact‖ / ‖exact‖
    error_vs_change: float  # the quantization noise against the adapter's change
    change: float  # ‖ΔW‖ / ‖W‖


@dataclass
class GgufVerify:
    """``--verify`` of a GGUF merge: the written file read back."""

    tensors_checked: int
    metadata_keys: int


@dataclass
class ImatrixUse:
    """``--imatrix``: the importance matrix given and which changed tensors it weighted."""

    file: str  # path, entries, chunks, dataset
    used: list[str]  # re-quantized with their entry, as llama-quantize --imatrix does
    no_entry: list[str]  # K-quant tensors the file has no entry for: quantized without
    not_weighted: list[str]  # written in a type ggml quantizes without one (Q8_0, F16 …)


@dataclass
class GgufMergeReport(Report):
    """A merge into a GGUF model (llama.cpp), quantized or not."""

    operation: str
    base: str
    output: str
    format: str  # "gguf"
    adapters: list[AdapterWeight]
    quant: str | None
    changed: list[GgufChange]
    tensors: int
    unchanged_copied: int
    max_error_vs_change: float
    seconds: float
    inert_modules: list[str]
    verify: GgufVerify | None = optional()
    # full tensors that are the base's own, as PEFT saves modules_to_save it did not train
    base_copies_left_out: list[str] | None = optional()
    # the base was quantized with an importance matrix, which the re-quantization did not use
    imatrix: str | None = optional()
    imatrix_used: ImatrixUse | None = optional()  # --imatrix

    def render(self) -> str:
        names = ", ".join(f"{a.adapter}×{a.weight:g}" for a in self.adapters)
        lines = [f"wrote {self.output}: merged {names} into {self.base} (GGUF)",
                 f"  {len(self.changed)} of {self.tensors} tensors changed and re-quantized, "
                 f"{self.unchanged_copied} copied byte for byte; {self.seconds:.2f} s"]
        lines += inert_lines(self.inert_modules)
        if self.imatrix:
            lines.append(f"  note: {self.imatrix}")
        if self.imatrix_used:
            u = self.imatrix_used
            lines.append(f"  importance matrix {u.file}: used for {len(u.used)} re-quantized "
                         "tensor(s), as llama-quantize --imatrix does")
            if u.no_entry:
                lines.append(f"  note: no entry for {listing(u.no_entry, 3)}: quantized "
                             "without one (as llama-quantize does)")
            if u.not_weighted:
                lines.append(f"  ({len(u.not_weighted)} written as Q8_0 or a float type, "
                             "which ggml quantizes without importance)")
        if self.base_copies_left_out:
            lines.append(f"  left out {len(self.base_copies_left_out)} full tensor(s) equal to "
                         f"the base's own (they change nothing): "
                         f"{listing(self.base_copies_left_out, 3)}")
        if self.changed:
            rows = [["tensor", "type", "written", "‖ΔW‖/‖W‖", "quant. error / ‖W′‖",
                     "quant. error / ‖ΔW‖"]]
            groups: dict[tuple[str, str, str], list[GgufChange]] = {}
            for c in self.changed:
                groups.setdefault((LAYER.sub("*", c.name), c.type, c.written_as), []).append(c)
            for (name, t, w), cs in groups.items():
                rows.append([name + (f" ×{len(cs)}" if len(cs) > 1 else ""), t, w,
                             num(max(c.change for c in cs)), num(max(c.rel_error for c in cs)),
                             num(max(c.error_vs_change for c in cs))])
            lines += [""] + ["  " + x for x in table(rows, right={3, 4, 5})]
            lines.append("  (largest per group; the last column is the quantization noise "
                         "against the adapter's change: near or above 1, the quantization "
                         "hides the change)")
        if self.verify:
            lines.append(f"  verify: the written file read back; {self.verify.tensors_checked} "
                         "tensors where planned, their bytes as computed or copied")
        return "\n".join(lines)


@dataclass
class PipelineMergeReport(Report):
    """A merge into a diffusers pipeline folder: one merge per component it changes."""

    output: str
    base: str
    pipeline: bool
    adapters: list[AdapterWeight]
    components: dict[str, MergeReport]
    carried_over: list[str]
    seconds: float

    def render(self) -> str:
        names = ", ".join(f"{a.adapter}×{a.weight:g}" for a in self.adapters)
        lines = [f"wrote {self.output}: a pipeline, {names} into {self.base}; "
                 f"{self.seconds:.2f} s; carried over as they are: "
                 f"{', '.join(self.carried_over) or 'nothing'}"]
        for name, r in self.components.items():
            merged = ", ".join(f"{a.adapter}×{a.weight:g}" for a in r.adapters)
            lines.append(f"  {name}: {r.operation}d {merged} "
                         f"{'into' if r.operation == 'merge' else 'from'} {r.base}")
            lines += ["  " + x for x in r.detail()]
        return "\n".join(lines)


MergeResult = MergeReport | GgufMergeReport | PipelineMergeReport
