"""``merge --qlora``: which base tensors bitsandbytes quantized when the adapter was trained,
and how (NF4 or FP4, block size, double quantization, dtypes): the merge then folds the
adapter into dequantize(quantize(W)) for those tensors (``engine.kernel.faithful_base``).

The settings come from the caller (``--qlora nf4`` and its flags), or (``--qlora auto``) from
what training left: a ``quantization_config`` (transformers' ``BitsAndBytesConfig``) in a JSON
file named with ``--qlora-config`` (a bnb-4bit model's config.json, a training config) or in
the adapter folder's config.json, or the section older PEFT versions write into the adapter's
README.md ("The following `bitsandbytes` quantization config was used during training").
PEFT's adapter_config.json does not record it.

The tensors are those transformers quantizes on ``from_pretrained(...,
quantization_config=BitsAndBytesConfig(load_in_4bit=True))``: the weight of every module
whose type is exactly ``nn.Linear`` or GPT-2's ``Conv1D`` (transposed before quantizing),
except the modules it keeps: with no ``llm_int8_skip_modules``, the output embedding
(``lm_head``), the tied weights and the last parameter's module; with a list, those named
(matched as transformers 5 matches them); and the architecture's ``_keep_in_fp32_modules``.

Example::

    plan = resolve("auto", None, ckpt, "base/", ["adapter/"])
    plan.fmt.quant_type, len(plan.tensors)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FormatError, LoraToolError, UsageError
from ..headers.checkpoint import Checkpoint
from ..headers.checks import limited_match, parse_json
from ..headers.paths import check_regular
from ..numerics.nf4 import FourBit
from ..reports.merge import QloraBase, QuantizedTensor
from .export_check import load_config
from .export_model import meta_model

QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB",
                  "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "half": "fp16",
                "float": "fp32", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_CARD = "bitsandbytes` quantization config was used during training"
_CARD_LINE = re.compile(r"^\s*-\s*(\w+):\s*(.+?)\s*$")


@dataclass
class QloraPlan:
    """What ``--qlora`` resolved to: the settings, where they were read, each quantized
    tensor (name → (settings, transposed)) and the Linear modules bitsandbytes keeps."""

    fmt: FourBit
    source: str
    tensors: dict[str, tuple[FourBit, bool]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    def report(self, measured: list[QuantizedTensor]) -> QloraBase:
        """The report's section: settings, counts, and how far the faithful base is from W,
        per tensor and over all of them, and against what the adapters change."""
        base = sum(t.base_norm ** 2 for t in measured) ** 0.5
        err = sum(t.quant_error ** 2 for t in measured) ** 0.5
        changed = [t for t in measured if t.change > 0]
        change = sum(t.change ** 2 for t in changed) ** 0.5
        err_changed = sum(t.quant_error ** 2 for t in changed) ** 0.5
        f = self.fmt
        return QloraBase(settings=f.describe(), quant_type=f.quant_type, blocksize=f.blocksize,
                         double_quant=f.double_quant, dtype=f.dtype,
                         compute_dtype=f.compute_dtype, source=self.source,
                         tensors=len(measured), changed=len(changed), kept=self.kept,
                         rel_base_error=err / base if base > 0 else 0.0,
                         error_vs_change=err_changed / change if change > 0 else None,
                         per_tensor=measured)


def refuse_quantized(base: Checkpoint, spec: str) -> None:
    """A base saved quantized (a bnb-4bit or 8-bit folder, any quantization_config) is not
    the W to quantize: the QLoRA base is W itself, in float."""
    qc = (base.config or {}).get("quantization_config")
    stored = [n for n in base.tensors if n.endswith(QUANT_SUFFIXES)]
    if qc or stored:
        raise FormatError(f"{spec}: the base is saved quantized ("
                          + (f"{stored[0]}" if stored else "quantization_config in config.json")
                          + "); --qlora quantizes the float base itself: give the unquantized "
                          "model the bnb-4bit one was made from (its config.json's "
                          "quantization_config can be passed with --qlora-config)")


def _dtype(value: object, what: str) -> str | None:
    if value is None:
        return None
    name = _DTYPE_NAMES.get(str(value).removeprefix("torch."))
    if name is None:
        raise FormatError(f"{what}: dtype {value!r} is not bfloat16, float16 or float32")
    return name


def _truth(value: object, key: str = "load_in_4bit", where: str = "") -> bool:
    """A flag as BitsAndBytesConfig holds it (true/false), or as a model card writes it
    ("True"); anything else is refused rather than read as false."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise FormatError(f"{where}: {key} must be true or false, not {value!r}")
    return text == "true"


def from_config(qc: dict[str, object], where: str, dtype: object = None
                ) -> tuple[FourBit, list[str] | None]:
    """A ``BitsAndBytesConfig`` as a dict: the settings and ``llm_int8_skip_modules``;
    transformers' defaults where a key is missing (fp4, no double quantization, float32
    compute)."""
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes" or not _truth(qc.get("load_in_4bit"), "load_in_4bit", where):
        raise FormatError(f"{where}: the quantization_config is not bitsandbytes 4-bit "
                          f"(quant_method {method}, load_in_4bit {qc.get('load_in_4bit')}); "
                          "--qlora reproduces 4-bit training only")
    skip = qc.get("llm_int8_skip_modules")
    if skip in (None, "None"):
        skip = None
    elif not isinstance(skip, list) or not all(isinstance(k, str) and k for k in skip):
        raise FormatError(f"{where}: llm_int8_skip_modules is not a list of module names")
    compute = _dtype(qc.get("bnb_4bit_compute_dtype", "float32"), where)
    double = _truth(qc.get("bnb_4bit_use_double_quant", False), "bnb_4bit_use_double_quant",
                    where)
    fmt = FourBit(str(qc.get("bnb_4bit_quant_type", "fp4")), 64, double, _dtype(dtype, where),
                  compute)
    return fmt, skip


def _card(readme: Path) -> dict[str, object] | None:
    """The quantization config an older PEFT wrote into the adapter's model card."""
    text = readme.read_text(encoding="utf-8", errors="replace")
    at = text.find(_CARD)
    if at < 0:
        return None
    qc: dict[str, object] = {}
    for line in text[at:].splitlines()[1:]:
        m = _CARD_LINE.match(line)
        if m:
            qc[m.group(1)] = m.group(2)
        elif qc and line.strip():
            break
    for k, v in qc.items():
        if isinstance(v, str) and v.startswith("["):
            qc[k] = [x.strip(" '\"") for x in v.strip("[]").split(",") if x.strip(" '\"")]
    return qc


def stated(config_file: str | os.PathLike[str] | None, specs: list[str]
           ) -> tuple[FourBit, list[str] | None, str]:
    """``--qlora auto``: the settings from ``config_file``, else from the adapters' folders
    (config.json, then README.md); the file they came from."""
    if config_file is not None:
        path = Path(config_file)
        check_regular(path)  # a FIFO or /dev/zero would never end
        try:
            data = parse_json(path.read_bytes(), f"--qlora-config {path}")
        except OSError as e:
            raise LoraToolError(f"--qlora-config {path}: cannot read it ({e})") from e
        if not isinstance(data, dict):
            raise FormatError(f"--qlora-config {path}: not a JSON object")
        qc = data.get("quantization_config", data)
        if not isinstance(qc, dict):
            raise FormatError(f"--qlora-config {path}: quantization_config is not an object")
        return (*from_config(qc, str(path), data.get("dtype", data.get("torch_dtype"))),
                str(path))
    found = []
    for spec in specs:
        folder = Path(spec) if Path(spec).is_dir() else Path(spec).parent
        cfg = folder / "config.json"
        if cfg.is_file():
            data = parse_json(cfg.read_bytes(), cfg)
            if isinstance(data, dict) and isinstance(data.get("quantization_config"), dict):
                found.append((*from_config(data["quantization_config"], str(cfg),
                                           data.get("dtype", data.get("torch_dtype"))),
                              str(cfg)))
                continue
        readme = folder / "README.md"
        qc = _card(readme) if readme.is_file() else None
        if qc is not None:
            found.append((*from_config(qc, str(readme)), str(readme)))
    if not found:
        raise UsageError("--qlora auto: no quantization config found beside the adapter "
                         "(PEFT's adapter_config.json does not record it); pass --qlora nf4 "
                         "or fp4 (and --qlora-double-quant if training used it), or "
                         "--qlora-config FILE")
    if any(f[:2] != found[0][:2] for f in found[1:]):
        raise FormatError(f"--qlora auto: {found[0][2]} and {found[1][2]} state different "
                          "quantizations; merge the adapters one at a time")
    return found[0]


def _kept(model: torch.nn.Module, skip: list[str] | None) -> list[str]:
    """The modules transformers does not convert (``get_modules_to_not_convert``)."""
    out: list[str] = []
    if skip is None:
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        out += [k for kv in tied.items() for k in kv]
        params = list(model.named_parameters())
        out += [params[-1][0]] if params else []
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") \
            else None
        out += [n for n, m in model.named_modules() if head is not None and m is head]
    out += list(skip or []) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted({k.removesuffix(".weight") for k in out})


def _converts(name: str, kept: list[str]) -> bool:
    """transformers 5's ``should_convert_module``: a kept pattern matches from the start up
    to a module boundary, as a regex, or as a suffix. The patterns come from a config file:
    an invalid one, or one that backtracks for ever, is refused."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for k in kept:
        if limited_match(rf"(?:{k}){boundary}", k, name, "llm_int8_skip_modules:") \
                or name.endswith(k):
            return False
    return True


def quantized_tensors(base: Checkpoint, spec: str, fmt: FourBit, skip: list[str] | None
                      ) -> tuple[dict[str, tuple[FourBit, bool]], list[str]]:
    """Each base tensor bitsandbytes quantizes (→ (settings, transposed)), and the Linear
    modules it keeps, from the architecture transformers builds from config.json."""
    if base.config is None:
        raise FormatError(f"{spec}: --qlora needs the base's config.json: which layers "
                          "bitsandbytes quantized depends on the architecture")
    config = load_config(base, spec)
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    model = meta_model(config, "causal-lm" if causal else "feature-extraction", "fp32").model
    kept = _kept(model, skip)
    prefix = getattr(model, "base_model_prefix", "") + "."
    out: dict[str, tuple[FourBit, bool]] = {}
    linear_kept = []
    for name, m in model.named_modules():
        conv1d = type(m).__name__ == "Conv1D"
        if not (type(m) is torch.nn.Linear or conv1d):
            continue
        if not _converts(name, kept):
            linear_kept.append(name)
            continue
        candidates = [name + ".weight", name.removeprefix(prefix) + ".weight",
                      prefix + name + ".weight"]
        tensor = next((c for c in candidates if c in base.tensors), None)
        if tensor is None:
            raise FormatError(f"{spec}: no tensor holds {name}'s weight; is config.json "
                              "this checkpoint's?")
        out[tensor] = (fmt, conv1d)
    if not out:
        raise FormatError(f"{spec}: no layer that bitsandbytes quantizes (nn.Linear) in "
                          f"this architecture ({', '.join(archs) or config.model_type})")
    return out, linear_kept


def resolve(qlora: str | FourBit, config_file: str | os.PathLike[str] | None,
            base: Checkpoint, spec: str, specs: list[str]) -> QloraPlan:
    """``--qlora`` made concrete for this base and these adapters."""
    refuse_quantized(base, spec)
    skip: list[str] | None = None
    if isinstance(qlora, FourBit):
        fmt, source = qlora, "given"
    elif qlora == "auto" or config_file is not None:
        fmt, skip, source = stated(config_file, specs)
    else:
        fmt, source = FourBit(qlora), "given"
    tensors, kept = quantized_tensors(base, spec, fmt, skip)
    return QloraPlan(fmt, source, tensors, kept)
