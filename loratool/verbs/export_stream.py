"""``export --stream``: an ONNX model of any size in the memory of a few tensors.

The graph is traced from the architecture built on the meta device (shapes, no weights), so
tracing a 7B model costs what tracing a small one does. The weights are then written straight
into ``model.onnx.data`` one tensor at a time: read from the base, merged with the adapters by
the merge code (float32, rounded once), appended at an aligned offset, and declared as an
external initializer of the graph. Buffers the checkpoint does not hold (rotary frequencies,
position ids) come from a one-layer stand-in of the same config.

Verification (export_verify) runs the exported graph in onnxruntime against the model
transformers loads from the base with the adapters merged in memory (the in-memory export's
path, independent of how the weights were placed here); a model too big to hold twice is
verified on a truncated copy (its first layers, exported by the same code), and the report
says which.

Example::
    streamed = write_streamed(base, graph, edits, Path("tmp"))
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..engine import kernel
from ..engine.plan import Edit
from ..errors import FormatError
from ..headers.changes import HEAD_TENSOR, input_embedding
from ..headers.checkpoint import Checkpoint
from ..io.directio import SequentialWriter
from ..io.tensors import tensor_bytes
from ..options import Options
from ..reports.export import Streamed
from .export_cache import export_failed, quiet_exporter
from .export_model import GraphSpec, Wrapper, meta_model

if TYPE_CHECKING:
    import onnx
    from transformers import PretrainedConfig

DATA = "model.onnx.data"
ALIGN = 4096  # initializers at page offsets: onnxruntime can map them
_LAYER = re.compile(r"\.(\d+)\.")


def trace(module: Wrapper, graph: GraphSpec, path: Path) -> onnx.ModelProto:
    """The ONNX graph of the meta model, without initializers (they are written after)."""
    import onnx

    names = graph.names
    dyn = tuple({0: "batch", 1: "sequence"} for _ in names)
    try:
        with quiet_exporter(), torch.no_grad():
            # optimize=False: constant folding would read weights the meta model does not have
            prog = torch.onnx.export(module, tuple(graph.example[n] for n in names),
                                     dynamo=True, dynamic_shapes=dyn, input_names=names,
                                     output_names=[graph.output], opset_version=graph.opset,
                                     optimize=False)
    except Exception as e:  # the exporter's errors are long; keep the first line
        raise export_failed("torch.onnx.export", graph.config.model_type, e) from e
    assert prog is not None  # dynamo=True returns the program
    prog.save(str(path), include_initializers=False)  # meta values: the real ones come after
    return onnx.load(str(path), load_external_data=False)


def needed(proto: onnx.ModelProto) -> list[str]:
    """The names the graph reads that no node or input produces: its initializers."""
    made = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    out: list[str] = []
    for n in proto.graph.node:
        for i in n.input:
            if i and i not in made and i not in out:
                out.append(i)
    return out


def stand_in_buffers(config: PretrainedConfig, task: str, dtype: str
                     ) -> dict[str, torch.Tensor]:
    """Buffers of a one-layer, small-vocabulary copy of the architecture, by name with layer
    numbers as ``.0.``: what __init__ computes (rotary frequencies, position ids), which a
    checkpoint does not hold."""

    import transformers

    small = copy.deepcopy(config)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(small, key):
            setattr(small, key, 1)
    ids = [getattr(small, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")]
    if all(i is None or (isinstance(i, int) and i < 256) for i in ids):
        small.vocab_size = 256  # buffers do not depend on it; the embeddings would be big
    cls = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    with quiet_exporter():
        model = cls.from_config(small, trust_remote_code=False, dtype=torch.float32).eval()
    if dtype == "fp16":
        model = model.half()
    return {_LAYER.sub(".0.", n): b.detach() for n, b in model.named_buffers()}


def source(name: str, base: Checkpoint, tied: str | None) -> str | None:
    """The base tensor behind a graph initializer (``model.`` is the wrapper's attribute)."""

    p = name[len("model."):] if name.startswith("model.") else name
    p = p.replace(".base_layer.", ".")  # PEFT's wrapper around a layer given LoRA inputs
    parts = p.split(".")
    for cand in [p, *(".".join(parts[i:]) for i in range(1, len(parts))), "model." + p]:
        if cand in base.tensors:
            return cand
    if tied is not None and HEAD_TENSOR.search(p):
        return tied  # a head tied to the input embeddings is saved once, as the embeddings
    return None


def write_streamed(base: Checkpoint, graph: GraphSpec, edits: dict[str, Edit], folder: Path,
                   lora: tuple[list[str], int] | None = None, options: Options | None = None
                   ) -> Streamed:
    """Trace the meta model and write ``folder/model.onnx`` + ``model.onnx.data``. ``lora``
    (module names, rank): LoRA factors on those modules become graph inputs, zero by default
    (so that without an adapter the graph is the base), for onnxruntime's adapters."""
    import onnx

    options = options or Options()
    meta = meta_model(graph.config, graph.task, graph.dtype)
    if lora is not None:
        inject_lora(meta.model, *lora)
    shapes = {**dict(meta.named_parameters(remove_duplicate=False)),
              **dict(meta.named_buffers(remove_duplicate=False))}
    proto = trace(meta, graph, folder / "model.onnx")
    buffers = stand_in_buffers(graph.config, graph.task, graph.dtype)
    tied = input_embedding(base.tensors)
    offset, written, changed = 0, 0, 0
    inputs: list[onnx.ValueInfoProto] = []  # LoRA factors: overridable initializers
    # front to back past the page cache, while the next tensor is read and merged
    with SequentialWriter(folder / DATA, direct=options.direct_io) as f:
        for name in needed(proto):
            spec = shapes.get(name)
            if spec is None:
                raise FormatError(f"the exported graph reads {name}, which the model does not "
                                  "have")
            src = source(name, base, tied)
            if ".lora_A." in name or ".lora_B." in name:
                t, src = torch.zeros(spec.shape, dtype=spec.dtype), None
                inputs.append(onnx.helper.make_tensor_value_info(
                    name, _onnx_type(spec.dtype), list(spec.shape)))
            elif src is not None:
                t = base.load(src, dtype=torch.float32)
                if src in edits:
                    t = kernel.merged(t, edits[src], 1.0, torch.device("cpu"), name=src)
                    changed += 1
                t = t.to(spec.dtype)
            else:
                found = buffers.get(_LAYER.sub(".0.", name[len("model."):]))
                if found is None:
                    raise FormatError(f"{name} is neither in the base checkpoint nor a buffer "
                                      "the architecture computes; is the checkpoint complete?")
                t = found
            if tuple(t.shape) != tuple(spec.shape):
                raise FormatError(f"{name}: the checkpoint's {src} is {list(t.shape)}, the "
                                  f"architecture needs {list(spec.shape)}")
            t = t.contiguous().cpu()
            data = tensor_bytes(t)  # a view: copied once, into the writer's buffer
            f.write(b"\0" * (-offset % ALIGN))
            offset += -offset % ALIGN
            f.write(data)
            proto.graph.initializer.append(_external(name, t, offset, len(data)))
            offset += len(data)
            written += 1
            del t, data
    proto.graph.input.extend(inputs)
    onnx.save(proto, str(folder / "model.onnx"))
    return Streamed(initializers=written, changed=changed, bytes=offset,
                    lora_inputs=[i.name for i in inputs])


def _external(name: str, t: torch.Tensor, offset: int, length: int) -> onnx.TensorProto:
    """An initializer whose values lie in ``model.onnx.data`` at ``offset``."""
    import onnx

    init = onnx.TensorProto(name=name, data_type=_onnx_type(t.dtype), dims=list(t.shape))
    init.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", DATA), ("offset", str(offset)), ("length", str(length))):
        e = init.external_data.add()
        e.key, e.value = k, v
    return init


def inject_lora(model: torch.nn.Module, modules: list[str], rank: int) -> None:
    """PEFT's LoRA layers on exactly these modules, rank ``rank``, scale 1 (each adapter's
    scale is folded into its lora_B when it is written as an onnxruntime adapter)."""

    # peft imports bitsandbytes where it is installed, whose CPU backend logs a warning about
    # an optional kernels package on import: nothing to do with this export
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from peft import LoraConfig, inject_adapter_in_model

    pattern = "|".join(re.escape(m) for m in modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out set for Conv1D: PEFT says so
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                           target_modules=f"^(?:{pattern})$",
                                           init_lora_weights=False), model)


def _onnx_type(dtype: torch.dtype) -> int:
    import onnx

    types: dict[torch.dtype, int] = {
        torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
        torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.int64: onnx.TensorProto.INT64,
        torch.int32: onnx.TensorProto.INT32, torch.bool: onnx.TensorProto.BOOL}
    return types[dtype]


FULL_CHECK = 256 << 20  # bytes of weights up to which the whole model is checked in memory
KEEP_LAYERS = 1  # the embeddings, one layer, the head: every kind of weight, placed


def truncated(config: PretrainedConfig) -> tuple[PretrainedConfig, int] | None:
    """The config cut to its first layers (and the number it had), or None when it has no
    layer count transformers reads."""

    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n <= KEEP_LAYERS:
        return None
    small = copy.deepcopy(config)
    small.num_hidden_layers = KEEP_LAYERS
    return small, n


def verification_cut(config: PretrainedConfig, nbytes: int
                     ) -> tuple[PretrainedConfig, int] | None:
    """What a streamed export is verified on: None for the whole model (small enough to hold
    beside its graph), else the config of a copy of its first layers and the layer count."""
    return truncated(config) if nbytes > FULL_CHECK else None


def cut_mode(n: int) -> str:
    """The report's words for a verification on the first-layers copy."""
    return (f"the embeddings, the first {KEEP_LAYERS} of {n} layers and the head, exported by "
            "the same code (the whole model would not fit in memory twice)")
