"""``export --with-past``: prefill and decode graphs over a KV cache, and the quiet context the
exporter runs in.

``prefill.onnx`` takes ``input_ids`` and ``attention_mask`` and returns the logits and
``present.{layer}.key/value``; ``decode.onnx`` also takes ``past.{layer}.key/value``. They are
verified by a prefill and one decode step in onnxruntime against PyTorch's logits for the
whole sequence.

Example::
    past = with_past(model, config, tmp, vocab=1024, opset=None, seed=2, verify=True,
                     atol=1e-4)
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from ..errors import LoraToolError
from ..reports.export import PastVerification, WithPast

if TYPE_CHECKING:
    from transformers import DynamicCache, PretrainedConfig


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter and transformers print progress and warnings; only cli.py prints. The
    fake-tensor dispatcher also logs, with a traceback, every exception that passes through
    it (a Ctrl-C while tracing among them) before raising it: the exception itself reaches
    the error boundary, which says it in one line."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export",
                                              "transformers", "onnxscript",
                                              "torch._subclasses")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL if lg.name == "torch._subclasses" else logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_failed(what: str, model_type: object, e: Exception) -> LoraToolError:
    """An exporter's failure in one line, naming the architecture (its errors are long)."""
    return LoraToolError(f"{what} failed for {model_type}: {type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}")


def _cache_layout(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder's KV cache."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return layers, kv, head_dim


def _cached_wrappers(model: torch.nn.Module, layers: int
                     ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Prefill (ids, mask → logits, present.*) and decode (ids, mask, past.* → logits,
    present.*) modules over a DynamicCache, flattened to plain tensors for ONNX."""

    from transformers import DynamicCache

    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"

    def flat(cache: DynamicCache) -> list[torch.Tensor]:
        out = []
        for i in range(layers):
            layer = cache.layers[i]
            out += [layer.keys, layer.values]
        return out

    class Prefill(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, ...]:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=True, **{kw: DynamicCache()})
            return (out.logits, *flat(out.past_key_values))

    class Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=True, **{kw: cache})
            return (out.logits, *flat(out.past_key_values))

    return Prefill().eval(), Decode().eval()


def _export_with_past(model: torch.nn.Module, config: PretrainedConfig, tmp: Path, vocab: int,
                      opset: int | None, seed: int, verify: bool, atol: float) -> WithPast:
    """prefill.onnx and decode.onnx, traced on random inputs, then checked (``verify``)."""

    layers, kv, head_dim = _cache_layout(config)
    prefill, decode = _cached_wrappers(model, layers)
    names = [f"past.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    presents = [n.replace("past.", "present.") for n in names]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    dt = next(model.parameters()).dtype
    past = [torch.randn(2, kv, 5, head_dim, generator=g).to(dt) for _ in names]
    step = torch.randint(0, vocab, (2, 2), generator=g)  # seq ≥ 2 when tracing
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(prefill, (ids, mask), str(tmp / "prefill.onnx"), dynamo=True,
                          dynamic_shapes={"input_ids": {0: "batch", 1: "sequence"},
                                          "attention_mask": {0: "batch", 1: "sequence"}},
                          input_names=["input_ids", "attention_mask"],
                          output_names=["logits", *presents], opset_version=opset,
                          external_data=True)
        torch.onnx.export(decode, (step, torch.ones(2, 7, dtype=torch.long), *past),
                          str(tmp / "decode.onnx"), dynamo=True,
                          dynamic_shapes={"input_ids": {0: "batch", 1: "sequence"},
                                          "attention_mask": {0: "batch", 1: "total"},
                                          "past": tuple({0: "batch", 2: "past_sequence"}
                                                        for _ in names)},
                          input_names=["input_ids", "attention_mask", *names],
                          output_names=["logits", *presents], opset_version=opset,
                          external_data=True)
    result = _check_past(model, tmp, names, vocab, g, atol) if verify else \
        PastVerification(checked=False)
    return WithPast(graphs=["prefill.onnx", "decode.onnx"], past_inputs=names,
                    present_outputs=presents, verification=result)


def _check_past(model: torch.nn.Module, tmp: Path, names: list[str], vocab: int,
                g: torch.Generator, atol: float) -> PastVerification:
    """A prefill and one decode step in onnxruntime against PyTorch's logits for the whole
    sequence."""
    import onnxruntime as ort

    pre = ort.InferenceSession(str(tmp / "prefill.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(tmp / "decode.onnx"), providers=["CPUExecutionProvider"])
    prompt = torch.randint(0, vocab, (3, 6), generator=g)
    nxt = torch.randint(0, vocab, (3, 1), generator=g)
    outs = pre.run(None, {"input_ids": prompt.numpy(),
                          "attention_mask": np.ones((3, 6), dtype=np.int64)})
    step_out = dec.run(None, {"input_ids": nxt.numpy(),
                              "attention_mask": np.ones((3, 7), dtype=np.int64),
                              **dict(zip(names, outs[1:]))})
    full = torch.cat([prompt, nxt], 1)
    with torch.no_grad():  # the reference: one forward pass over the whole sequence
        ref = model(input_ids=full, attention_mask=torch.ones_like(full),
                    use_cache=False).logits.float().numpy()
    worst = max(float(np.abs(outs[0].astype(np.float32) - ref[:, :6]).max()),
                float(np.abs(step_out[0].astype(np.float32) - ref[:, 6:]).max()))
    if not worst <= atol:
        raise LoraToolError(f"verification failed: the prefill/decode graphs differ from "
                            f"PyTorch by {worst:.3g} > --atol {atol:g}; nothing was written")
    return PastVerification(checked=True, max_abs_diff=worst, atol=atol, ok=worst <= atol)


def with_past(model: torch.nn.Module, config: PretrainedConfig, tmp: Path, vocab: int,
              opset: int | None, seed: int, verify: bool, atol: float) -> WithPast:
    """prefill.onnx and decode.onnx over a KV cache for ``model`` (merged, in memory) in
    ``tmp``; any failure of the exporter is one line naming the architecture."""
    try:
        return _export_with_past(model, config, tmp, vocab, opset, seed, verify, atol)
    except LoraToolError:
        raise
    except Exception as e:
        raise export_failed("--with-past export", config.model_type, e) from e
