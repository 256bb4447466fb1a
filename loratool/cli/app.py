"""The command line: a thin click group, and the one error boundary in :func:`main`.

Commands parse flags (ranges and forms are checked by click's types: a bad value is a usage
error, exit 2), call a verb, and print what ``render.py`` makes of its report. Only this module
prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..about import __version__
from ..cli.kit import (
    DEVICE,
    DTYPES,
    FORCE,
    FORMATS,
    JSON,
    REPO_TYPE,
    WEIGHTS,
    Finite,
    State,
    adapter_out_options,
    analyze_options,
    echo,
    extract_options,
    file_filters,
    merge_options,
    notes,
    output,
    policy,
    progress,
    quiet_option,
    rank_policy_options,
    run,
    safe,
    show,
)

# --------------------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]},
             invoke_without_command=True)
@click.version_option(__version__, prog_name="loratool")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes on stderr.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """Model surgery and LoRA adapter management.

    Inputs may be local paths or Hub ids (org/name or org/name@revision).
    Run `loratool demo` for a tour on a small built-in model.
    """
    ctx.obj = State(quiet)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (see docs/cli.md).")
@click.option("--filter", "filters", multiple=True, metavar="GLOB",
              help="Only tensors/modules whose name matches GLOB (repeatable).")
@click.option("--against", metavar="OTHER",
              help="Compare with another checkpoint tensor by tensor (reads tensor data).")
@click.option("--all", "expand", is_flag=True, help="List every tensor instead of groups.")
@quiet_option
@click.pass_context
def inspect(ctx: click.Context, path: str, as_json: bool, filters: tuple[str, ...],
            against: str | None, expand: bool) -> None:
    """Show what is in a checkpoint or adapter, from its headers alone.

    \b
    Examples:
      loratool inspect ./Llama-3.2-1B
      loratool inspect ./my-adapter --json
      loratool inspect base/ --against tuned/ --filter '*layers.0.*'
    """
    from ..verbs.inspect import inspect as run

    report = run(path, filters=list(filters), against=against, progress=progress(ctx))
    if as_json:
        click.echo(report.to_json())  # JSON escapes control characters itself
    else:
        echo(report.render(expand=expand))


@cli.command()
@click.argument("base")
@click.argument("tuned")
@extract_options
@click.pass_context
def extract(ctx: click.Context, base: str, tuned: str, out: Path, rank: int | None,
            energy: float | None, max_error: float | None, budget: str | None,
            max_rank: int | None, targets: tuple[str, ...], excludes: tuple[str, ...],
            device: str, fmt: str | None, dtype: str, exact_svd: bool, embed_lora: bool,
            skip_full: bool, seed: int, report_path: Path | None, force: bool,
            as_json: bool) -> None:
    """Extract a LoRA adapter from a fine-tuned model: ΔW = TUNED − BASE, factorised.

    A randomized SVD per changed weight at the rank the policy picks; the error of the stored
    factors is measured and reported per module.

    \b
    Examples:
      loratool extract ./base ./tuned -o ./adapter --rank 32
      loratool extract ./base ./tuned -o ./adapter --max-error 0.05 --max-rank 128
      loratool extract ./base ./tuned -o ./adapter --budget 50MB --report report.json
    """
    from ..options import RankPolicy
    from ..reports.render import format_extract
    from ..verbs.extract import extract as run

    policy = RankPolicy.from_options(rank, energy, max_error, budget, max_rank)
    report = run(base, tuned, out, policy, targets=list(targets), excludes=list(excludes),
                 device=device, fmt=fmt, exact_svd=exact_svd, embed_lora=embed_lora,
                 skip_full=skip_full, seed=seed, dtype=dtype, force=force,
                 report_path=report_path, progress=progress(ctx))
    show(report, as_json, format_extract)
    notes(ctx, report["notes"])


def _run_merge(ctx: click.Context, sign: float, base: str, adapters: tuple[str, ...],
               out: Path, weights: tuple[float, ...], device: str, dtype: str,
               max_shard_size: str, untie: bool, verify: bool, force: bool,
               as_json: bool, quant: str | None, record: bool = True) -> None:
    from ..reports.render import format_merge
    from ..verbs.merge_pipeline import run

    show(run(base, list(adapters), out, weights=list(weights), sign=sign, device=device,
               dtype=dtype, max_shard_size=max_shard_size, force=force, untie=untie,
               verify=verify, record=record, quant=quant, progress=progress(ctx)), as_json,
         format_merge)


@cli.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@merge_options
@click.option("--no-record", is_flag=True,
              help="Do not write loratool-unmerge.safetensors (the base tensors that full "
                   "tensors replace, DoRA row norms); unmerge then refuses those.")
@click.pass_context
def merge(ctx: click.Context, base: str, adapters: tuple[str, ...], no_record: bool,
          **kw: Any) -> None:
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
    """
    _run_merge(ctx, 1.0, base, adapters, record=not no_record, **kw)


@cli.command()
@click.argument("merged")
@click.argument("adapters", nargs=-1, required=True)
@merge_options
@click.pass_context
def unmerge(ctx: click.Context, merged: str, adapters: tuple[str, ...], **kw: Any) -> None:
    """Take adapters back out of a merged model (the same deltas, subtracted in float32).

    Tensors an adapter replaced in full, and DoRA merges, are undone exactly with what
    `loratool merge` recorded beside the model (loratool-unmerge.safetensors).

    \b
    Example:
      loratool unmerge ./merged ./my-adapter -o ./base-again
    """
    _run_merge(ctx, -1.0, merged, adapters, **kw)


@cli.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--method", required=True, type=click.Choice(
    ["cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]),
    help="cat: exact sum; svd: exact sum recompressed; ties/dare/magnitude_prune: see docs.")
@WEIGHTS
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), default=0.5,
              show_default=True,
              help="Fraction of entries kept by ties, dare_* and magnitude_prune, 0 < D ≤ 1.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of DARE's drops.")
@click.option("--exact-svd", is_flag=True, help="Full SVD when factorising dense results.")
@adapter_out_options(one=False)
@click.pass_context
def combine(ctx: click.Context, adapters: tuple[str, ...], method: str,
            weights: tuple[float, ...], density: float, seed: int, exact_svd: bool, out: Path,
            rank: int | None, energy: float | None, max_error: float | None,
            budget: str | None, max_rank: int | None, fmt: str | None, base: str | None,
            dtype: str, force: bool, as_json: bool) -> None:
    """Combine adapters: exact weighted sums (cat), recompressed without dense matrices (svd),
    or TIES / DARE / magnitude pruning.

    \b
    Examples:
      loratool combine style/ task/ --method cat --weight 0.7 --weight 1 -o both/
      loratool combine a/ b/ c/ d/ --method svd --rank 16 -o merged-16/
      loratool combine a/ b/ --method ties --density 0.3 --rank 32 -o ties/
    """
    from ..reports.render import format_combine
    from ..verbs.combine import combine as run

    report = run(list(adapters), out, method, weights=list(weights),
                 policy=policy(rank, energy, max_error, budget, max_rank),
                 density=density, seed=seed, fmt=fmt, dtype=dtype, exact_svd=exact_svd,
                 base=base, force=force, progress=progress(ctx))
    show(report, as_json, format_combine)
    notes(ctx, report["notes"])


@cli.command()
@click.argument("adapter")
@adapter_out_options(one=True)
@click.pass_context
def resize(ctx: click.Context, adapter: str, out: Path, rank: int | None,
           energy: float | None, max_error: float | None, budget: str | None,
           max_rank: int | None, fmt: str | None, base: str | None, dtype: str, force: bool,
           as_json: bool) -> None:
    """Reduce an adapter's rank optimally (the truncated SVD of each module's B@A, computed
    from the factors), reporting the rank and the error per module.

    \b
    Examples:
      loratool resize ./adapter-r64 --rank 16 -o ./adapter-r16
      loratool resize ./adapter --energy 0.99 -o ./smaller
    """
    from ..reports.render import format_combine
    from ..verbs.combine import combine as run

    report = run([adapter], out, "svd", weights=None,
                 policy=policy(rank, energy, max_error, budget, max_rank), fmt=fmt, dtype=dtype,
                 base=base, force=force, resize=True, progress=progress(ctx))
    show(report, as_json, format_combine)
    notes(ctx, report["notes"])


@cli.command()
@click.argument("adapter")
@output("Output: a folder (PEFT), a .safetensors file or folder (kohya, diffusers), a .gguf "
         "file or folder (GGUF).")
@click.option("--format", "--to", "to", required=True, type=click.Choice(FORMATS),
              help="Target format.")
@click.option("--base", metavar="BASE",
              help="The base model (path or Hub id): resolves kohya names, gives GGUF its "
                   "architecture, and checks that the adapter fits.")
@click.option("--drop-unsupported", is_flag=True,
              help="Drop what the target format cannot hold (named in the report) instead of "
                   "refusing.")
@rank_policy_options
@click.option("--dtype", type=click.Choice(DTYPES), default="keep", show_default=True,
              help="dtype of the LoRA factors made from LyCORIS modules (keep: theirs).")
@FORCE
@JSON
@quiet_option
@click.pass_context
def convert(ctx: click.Context, adapter: str, out: Path, to: str, base: str | None,
            drop_unsupported: bool,
            rank: int | None, energy: float | None, max_error: float | None,
            budget: str | None, max_rank: int | None, dtype: str, force: bool,
            as_json: bool) -> None:
    """Convert an adapter between PEFT, kohya, diffusers and llama.cpp GGUF.

    The format of ADAPTER is detected from its content. Lossless where the target can hold the
    adapter; otherwise refused with what would be lost, unless --drop-unsupported. LyCORIS
    LoHa, LoKr and full modules become LoRA at the rank policy you choose (--max-error,
    --rank, --energy, --budget), the error of each module measured and reported.

    \b
    Examples:
      loratool convert ./my-peft-adapter --format kohya -o my-lora.safetensors
      loratool convert my-lora.safetensors --format peft -o ./peft-adapter --base ./sd15/unet
      loratool convert ./my-peft-adapter --format gguf -o adapter.gguf --base org/Llama-3.2-1B
      loratool convert loha.safetensors --to kohya --max-error 0.01 --base sdxl/ -o l.safetensors
    """
    from ..reports.render import format_convert
    from ..verbs.convert import convert as run

    show(run(adapter, out, to, base=base, force=force, drop=drop_unsupported,
             policy=policy(rank, energy, max_error, budget, max_rank), dtype=dtype,
             progress=progress(ctx)), as_json, format_convert)


@cli.command()
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
    from ..reports.render import format_export
    from ..verbs.export import export as run

    show(run(base, list(adapters), out, weights=list(weights), dtype=dtype, opset=opset,
               task=task, atol=atol, verify=not no_verify, force=force, with_past=with_past,
               stream=stream, adapters_as_inputs=adapters_as_inputs, device=device,
               progress=progress(ctx)),
         as_json, format_export)


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@analyze_options
@click.pass_context
def analyze(ctx: click.Context, paths: tuple[str, ...], base: str | None, compare: bool,
            subspace: str, energies: tuple[float, ...], rank: int | None, max_rank: int,
            targets: tuple[str, ...], excludes: tuple[str, ...], device: str, exact_svd: bool,
            seed: int, plot: Path | None, html: Path | None, force: bool,
            as_json: bool) -> None:
    """How low-rank is a fine-tune, an adapter, or what two adapters share: the LoRA
    paper's analysis (spectrum and effective rank of ΔW, amplification, subspace similarity).

    PATHS is BASE TUNED (a fine-tune), ADAPTER (with --base for the amplification), or, with
    --compare, two adapters.

    \b
    Examples:
      loratool analyze ./Llama-3.2-1B ./my-finetune --plot plots/ --html analysis.html
      loratool analyze ./my-adapter --base ./Llama-3.2-1B
      loratool analyze --compare ./adapter-r8 ./adapter-r64
    """
    from ..reports.render_analyze import format_analyze
    from ..verbs import plots
    from ..verbs.analyze import analyze as run_analysis

    inputs = [Path(p) for p in (*paths, base) if p and Path(p).exists()]
    plots.check_outputs(plot, html, inputs, force)
    report = run_analysis(list(paths), base=base, compare=compare, subspace=subspace,
                          energies=tuple(energies) or (0.5, 0.9, 0.99), rank=rank,
                          max_rank=max_rank, targets=list(targets), excludes=list(excludes),
                          device=device, exact_svd=exact_svd, seed=seed,
                          progress=progress(ctx))
    if plot or html:
        report["written"] = plots.write(report, plot, html, safe(format_analyze(report)),
                                        inputs, force)
    show(report, as_json, format_analyze)


@cli.command()
@click.argument("repo_id")
@output("Download into this folder (default: the Hub cache).", required=False)
@click.option("--revision", help="Branch, tag or commit.")
@file_filters("weights, configs, tokenizer, adapter files")
@REPO_TYPE
@FORCE
@JSON
@quiet_option
@click.pass_context
def pull(ctx: click.Context, repo_id: str, out: Path | None, revision: str | None,
         include: tuple[str, ...], exclude: tuple[str, ...], repo_type: str, force: bool,
         as_json: bool) -> None:
    """Download a model or adapter from the Hub and print its local path.

    \b
    Examples:
      loratool pull meta-llama/Llama-3.2-1B
      loratool pull org/adapter --revision v2 -o ./adapter
    """
    from ..verbs.hub import pull as run

    r = run(repo_id, out, revision=revision, include=list(include), exclude=list(exclude),
            repo_type=repo_type, force=force, progress=progress(ctx))
    echo(json.dumps(r, indent=2) if as_json else r["path"])


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to push to (created if missing).")
@click.option("--message", help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@file_filters("every file but hidden and temporary ones")
@REPO_TYPE
@JSON
@quiet_option
@click.pass_context
def push(ctx: click.Context, path: Path, repo_id: str, private: bool, revision: str | None,
         message: str | None, create_pr: bool, include: tuple[str, ...],
         exclude: tuple[str, ...], repo_type: str, as_json: bool) -> None:
    """Upload a folder to the Hub in one commit, with a model card; print the commit URL.

    \b
    Examples:
      loratool push ./adapter me/my-adapter --private
      loratool push ./merged me/merged-model --revision v2 --message "rank 32"
    """
    from ..verbs.hub import push as run

    r = run(path, repo_id, private=private, revision=revision, message=message,
            create_pr=create_pr, include=list(include), exclude=list(exclude),
            repo_type=repo_type, progress=progress(ctx))
    echo(json.dumps(r, indent=2) if as_json else (r["pr_url"] or r["commit_url"]))


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("loratool-demo"),
              show_default=True, help="Where the demo models and results are written.")
@quiet_option
@click.pass_context
def demo(ctx: click.Context, workdir: Path) -> None:
    """Build a small Llama-style model and a fine-tune of it, and run every command on them.

    Nothing is downloaded. Example: loratool demo --workdir /tmp/demo
    """
    from ..verbs.demo import run_demo

    for section in run_demo(workdir, progress=progress(ctx)):
        echo(section)


def main(argv: list[str] | None = None) -> None:
    """Entry point: the CLI inside the one error boundary (``clikit.run``); with ``argv``
    (a caller in Python) an interrupt raises SystemExit(130) instead of exiting at once."""
    run(cli, argv)
