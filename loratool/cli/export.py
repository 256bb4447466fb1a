"""``loratool export``: a model with adapters merged, as ONNX verified in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import click

from ..verbs import prechecks
from .kit import (
    DEVICE,
    FORCE,
    JSON,
    WEIGHTS,
    Finite,
    options_of,
    output,
    progress,
    quiet_option,
    show,
    starting,
)


@click.command()
@click.argument("base")
@click.argument("adapters", nargs=-1)
@output("Output folder: model.onnx (+ model.onnx.data), config, tokenizer files, "
         "export.json.")
@WEIGHTS
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of the graph's weights and activations (bf16 does not run on "
                   "onnxruntime's CPU provider).")
@click.option("--opset", type=click.IntRange(min=1), help="ONNX opset (default: the "
              "exporter's own; the report gives the graph's); the graph is checked to have it.")
@click.option("--task", type=click.Choice(["auto", "causal-lm", "feature-extraction"]),
              default="auto", show_default=True,
              help="causal-lm exports logits; feature-extraction the last hidden state.")
@click.option("--atol", type=Finite(minimum=0.0),
              help="Largest accepted |ONNX − PyTorch| (default 1e-4 for fp32, 2e-2 for fp16).")
@click.option("--with-past", is_flag=True,
              help="Also export prefill.onnx and decode.onnx with a KV cache (causal LMs).")
@click.option("--stream", is_flag=True, help="Trace without weights, write the merged weights "
              "tensor by tensor: any size in a few tensors' memory (big models verified on a "
              "copy with their first layer).")
@click.option("--adapters-as-inputs", is_flag=True,
              help="Do not merge: the base graph with LoRA inputs, and each ADAPTER as an "
                   "onnxruntime adapter file (adapters/NAME.onnx_adapter) that one session "
                   "switches per run.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help="auto, cpu, "
              "cuda or cuda:N: where verification runs (cuda: onnxruntime-gpu).")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime check.")
@FORCE
@JSON
@quiet_option
@click.pass_context
def export(ctx: click.Context, base: str, adapters: tuple[str, ...], out: Path,
           weights: tuple[float, ...], dtype: str, opset: int | None, task: str,
           atol: float | None, with_past: bool, stream: bool, adapters_as_inputs: bool,
           device: str, no_verify: bool, force: bool, as_json: bool) -> None:
    """Export BASE with ADAPTERs merged in memory to ONNX, verified in onnxruntime.

    Needs the extra: pip install 'loratool[onnx]'.

    \b
    Examples:
      loratool export ./Llama-3.2-1B ./my-adapter -o ./onnx
      loratool export ./all-MiniLM-L6-v2 ./adapter -o ./onnx --dtype fp16
      loratool export ./Llama-3.1-8B ./adapter -o ./onnx --stream
      loratool export ./Llama-3.2-1B ./task-a ./task-b -o ./onnx --adapters-as-inputs
    """
    what = "with adapters as inputs" if adapters_as_inputs else "merged"
    starting(ctx, f"exporting {base} to ONNX ({what}) → {out}")
    prechecks.export(base, list(adapters), out, force=force, as_inputs=adapters_as_inputs)
    from ..verbs.export import export as run

    report = run(base, list(adapters), out, weights=list(weights), dtype=dtype, opset=opset,
                 task=task, atol=atol, verify=not no_verify, force=force, with_past=with_past,
                 stream=stream, adapters_as_inputs=adapters_as_inputs, device=device,
                 options=options_of(ctx), progress=progress(ctx))
    show(ctx, report, as_json)
