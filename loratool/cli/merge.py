"""``loratool merge`` and ``unmerge``: adapters folded into a model and taken out again."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError
from ..verbs import prechecks
from .kit import (
    adapters_text,
    merge_options,
    options_of,
    progress,
    show,
    starting,
)

MergeFlag = Path | tuple[float, ...] | str | bool | None  # the values merge_options gives


QLORA_TYPES = ("nf4", "fp4", "auto")
QLORA_HELP = ("The adapter was trained on the base quantized by bitsandbytes (QLoRA): fold it "
              "into dequantize(quantize(W)) as trained. nf4 or fp4, or auto (read from "
              "--qlora-config or beside the adapter).")


def _fourbit(verb: object, qlora: str | None, config: Path | None, double: bool,
             blocksize: int | None, qdtype: str | None) -> object:
    """The API's ``qlora``: the type with its flags made into settings, or "auto"."""
    flags = double or blocksize is not None or qdtype is not None
    if qlora in (None, "auto"):
        if flags:
            raise UsageError("--qlora-double-quant, --qlora-blocksize and --qlora-dtype "
                                   "go with --qlora nf4 or fp4; auto reads them from the "
                                   "config")
        return "auto" if qlora or config else None
    if config is not None:
        raise UsageError("--qlora-config goes with --qlora auto (it states the type)")
    return verb.FourBit(qlora, blocksize or 64, double, qdtype, qdtype)  # type: ignore


def _run_merge(ctx: click.Context, sign: float, base: str, adapters: tuple[str, ...],
               out: Path, weights: tuple[float, ...], device: str, dtype: str,
               max_shard_size: str, untie: bool, verify: bool, force: bool,
               as_json: bool, quant: str | None, record: bool = True, exact: bool = True,
               imatrix: Path | None = None, qlora: str | None = None,
               qlora_config: Path | None = None, qlora_double_quant: bool = False,
               qlora_blocksize: int | None = None, qlora_dtype: str | None = None) -> None:
    if sign > 0:
        starting(ctx, f"merging {adapters_text(adapters)} into {base} → {out}")
    else:
        starting(ctx, f"taking {adapters_text(adapters)} out of {base} → {out}")
    prechecks.merge(base, list(adapters), out, force=force, quant=quant, unmerge=sign < 0,
                    imatrix=imatrix, qlora=qlora is not None or qlora_config is not None,
                    qlora_config=qlora_config)
    from ..verbs import merge as verb

    common = dict(weights=list(weights), device=device, dtype=dtype,
                  max_shard_size=max_shard_size, untie=untie, verify=verify, force=force,
                  options=options_of(ctx), progress=progress(ctx))
    if sign > 0:
        fourbit = _fourbit(verb, qlora, qlora_config, qlora_double_quant, qlora_blocksize,
                           qlora_dtype)
        report = verb.merge(base, list(adapters), out, record=record, exact_record=exact,
                            quant=quant, imatrix=imatrix, qlora=fourbit,
                            qlora_config=qlora_config, **common)
    else:
        report = verb.unmerge(base, list(adapters), out, **common)
    show(ctx, report, as_json)


@click.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@merge_options
@click.option("--no-record", is_flag=True,
              help="Do not write loratool-unmerge.safetensors (the base tensors that full "
                   "tensors replace, DoRA row norms); unmerge then refuses those.")
@click.option("--no-exact-record", is_flag=True,
              help="Leave out of that record the values (W + ΔW) − ΔW does not give back "
                   "(about 1 %% of the changed ones); unmerge is then exact up to rounding.")
@click.option("--imatrix", type=click.Path(path_type=Path), metavar="FILE",
              help="GGUF bases: a llama.cpp importance matrix (llama-imatrix's .gguf or .dat); "
                   "changed K-quant tensors are quantized with it as llama-quantize --imatrix "
                   "does.")
@click.option("--qlora", type=click.Choice(QLORA_TYPES), help=QLORA_HELP)
@click.option("--qlora-config", type=click.Path(path_type=Path),
              metavar="FILE",
              help="A JSON file with the training's quantization_config (a bnb-4bit model's "
                   "config.json, a BitsAndBytesConfig): --qlora's settings.")
@click.option("--qlora-double-quant", is_flag=True,
              help="With --qlora nf4/fp4: training quantized the absmax too "
                   "(bnb_4bit_use_double_quant).")
@click.option("--qlora-blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024",
                                                       "2048", "4096"]),
              callback=lambda c, p, v: int(v) if v else None, metavar="N",
              help="With --qlora nf4/fp4: bitsandbytes' block size (default 64, as "
                   "transformers uses).")
@click.option("--qlora-dtype", type=click.Choice(["bf16", "fp16", "fp32"]),
              help="With --qlora nf4/fp4: the dtype training loaded the base in and computed "
                   "in (default: the base's own).")
@click.pass_context
def merge(ctx: click.Context, base: str, adapters: tuple[str, ...], no_record: bool,
          no_exact_record: bool, imatrix: Path | None, **kw: MergeFlag) -> None:
    """Fold one or more adapters into BASE and write a model folder transformers loads.

    Streams tensor by tensor (memory stays near one tensor); math in float32 on the chosen
    device, rounded once to the output dtype; in float32 the result equals PEFT's
    merge_and_unload bit for bit.

    \b
    Examples:
      loratool merge ./Llama-3.2-1B ./my-adapter -o ./merged
      loratool merge base/ style/ task/ --weight 0.7 --weight 1.0 -o merged/ --dtype bf16
      loratool merge base/ adapter/ -o merged/ --device cuda --verify
      loratool merge ./sdxl-pipeline style.safetensors -o ./sdxl-style
      loratool merge model-Q4_K_M.gguf adapter/ -o merged.gguf --imatrix imatrix.gguf
      loratool merge ./Llama-3.2-1B ./qlora-adapter -o ./merged --dtype bf16 --qlora nf4 \\
          --qlora-double-quant
    """
    _run_merge(ctx, 1.0, base, adapters, record=not no_record, exact=not no_exact_record,
               imatrix=imatrix, **kw)


@click.command()
@click.argument("merged")
@click.argument("adapters", nargs=-1, required=True)
@merge_options
@click.option("--qlora", type=click.Choice(QLORA_TYPES),
              help="Refused: a QLoRA-faithful merge cannot be undone into the float base.")
@click.pass_context
def unmerge(ctx: click.Context, merged: str, adapters: tuple[str, ...], **kw: MergeFlag
            ) -> None:
    """Take adapters back out of a merged model (the same deltas, subtracted in float32).

    Tensors an adapter replaced in full, and DoRA merges, are undone exactly with what
    `loratool merge` recorded beside the model (loratool-unmerge.safetensors).

    \b
    Example:
      loratool unmerge ./merged ./my-adapter -o ./base-again
    """
    _run_merge(ctx, -1.0, merged, adapters, **kw)
