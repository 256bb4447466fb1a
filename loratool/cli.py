"""The command line: a thin click group, and the one error boundary in :func:`main`.

Commands parse flags, call a verb module, and print what it returns. Only this module prints.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import LoraToolError


class State:
    """Options of the group that every command sees."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet


def _progress(ctx: click.Context) -> Any:
    """Drawn bars when a person watches (stderr is a terminal, no --quiet), else silence."""
    from .progress import SILENT, TqdmProgress

    state = ctx.find_object(State)
    return TqdmProgress() if not (state and state.quiet) and sys.stderr.isatty() else SILENT


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratool")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes on stderr.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """Model surgery and LoRA adapter management.

    Inputs may be local paths or Hub ids (org/name or org/name@revision).
    Run `loratool demo` for a tour on a small built-in model.
    """
    ctx.obj = State(quiet)
    from . import sources

    sources.SHOW_PROGRESS = not quiet and sys.stderr.isatty()


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (see docs/cli.md).")
@click.option("--filter", "filters", multiple=True, metavar="GLOB",
              help="Only tensors/modules whose name matches GLOB (repeatable).")
@click.option("--against", metavar="OTHER",
              help="Compare with another checkpoint tensor by tensor (reads tensor data).")
@click.option("--all", "expand", is_flag=True, help="List every tensor instead of groups.")
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
    from .checkpoint import open_checkpoint
    from .summary import compare, format_compare, format_summary, summarize

    ckpt = open_checkpoint(path)
    data = summarize(ckpt, list(filters) or None)
    cmp = None
    if against:
        cmp = compare(ckpt, open_checkpoint(against), list(filters) or None,
                      progress=_progress(ctx))
        data["compare"] = cmp
    if as_json:
        click.echo(json.dumps(data, indent=2, allow_nan=False))
        return
    click.echo(format_summary(data, expand=expand))
    if cmp is not None:
        click.echo("")
        click.echo(format_compare(data, cmp, expand=expand))


def rank_policy_options(f: Any) -> Any:
    """The rank-policy flags extract, combine and resize share."""
    for opt in reversed([
        click.option("--rank", type=int, help="Fixed rank (default 16), capped at min(out, in)."),
        click.option("--energy", type=float, metavar="F",
                     help="Smallest rank keeping a fraction F of Σσ² per module."),
        click.option("--max-error", type=float, metavar="E",
                     help="Smallest rank whose measured relative error ‖ΔW − BA‖/‖ΔW‖ ≤ E, "
                          "per module (a guarantee)."),
        click.option("--budget", metavar="P",
                     help="Total adapter parameters (5000000) or size (50MB), split across "
                          "modules to minimise the total squared error."),
        click.option("--max-rank", type=int, metavar="N", help="Cap on any policy's rank."),
    ]):
        f = opt(f)
    return f


def _merge_options(f: Any) -> Any:
    """The flags merge and unmerge share."""
    for opt in reversed([
        click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
                     help="Output model folder."),
        click.option("--weight", "weights", multiple=True, type=float, metavar="W",
                     help="Scale of each adapter's delta, one per adapter in order "
                          "(default 1; negative allowed)."),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda or cuda:N: where the math runs."),
        click.option("--dtype", type=click.Choice(["keep", "fp32", "bf16", "fp16"]),
                     default="keep", show_default=True, help="Output dtype of float tensors."),
        click.option("--max-shard-size", default="5GB", show_default=True,
                     help="Cut output shards at this size (5GB, 500MB, 2GiB)."),
        click.option("--untie", is_flag=True,
                     help="An adapter on a tied lm_head: write a separate lm_head instead of "
                          "refusing."),
        click.option("--verify", is_flag=True,
                     help="Re-read the output and check every changed tensor against a "
                          "float64 reference."),
        click.option("--force", is_flag=True, help="Replace an existing output (never an input)."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]):
        f = opt(f)
    return f


def _run_merge(ctx: click.Context, sign: float, base: str, adapters: tuple[str, ...],
               out: Path, weights: tuple[float, ...], device: str, dtype: str,
               max_shard_size: str, untie: bool, verify: bool, force: bool,
               as_json: bool, record: bool = True) -> None:
    from .merge import run

    report = run(base, list(adapters), out, weights=list(weights), sign=sign,
                 device=device, dtype=dtype, max_shard_size=max_shard_size, force=force,
                 untie=untie, verify=verify, record=record, progress=_progress(ctx))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    names = ", ".join(f"{a['adapter']}×{a['weight']:g}" for a in report["adapters"])
    click.echo(f"wrote {report['output']}: {report['operation']}d {names} into {base}")
    click.echo(f"  {report['tensors_changed']} of {report['tensors']} tensors changed, max "
               f"|ΔW| {report['max_abs_delta']:.3g}; {report['seconds']:.2f} s, "
               f"{report['gb_per_s']:.2f} GB/s on {report['device']}, peak RSS "
               f"{report['peak_rss_mb']:.0f} MiB"
               + (f", peak GPU {report['peak_gpu_mb']:.0f} MiB" if "peak_gpu_mb" in report
                  else ""))
    kept = [f"{n} tensors replaced in full" for n in [report["replaced_recorded"]] if n] + [
        f"DoRA row norms of {n} tensors" for n in [report["dora_norms_recorded"]] if n]
    if kept:
        click.echo(f"  recorded {' and '.join(kept)} in {report['record']}, so that unmerge "
                   "gives the base back")
    if report["not_copied"]:
        left = report["not_copied"]
        click.echo(f"  left out {len(left)} file(s) of the base that hold its old weights in "
                   f"another format: {', '.join(left[:4])}" + (" …" if len(left) > 4 else ""))
    v = report.get("verify")
    if v:
        click.echo(f"  verify: {v['checked']} changed tensors within the rounding bound; worst "
                   f"{v['name']} at {v['ratio']:.3f}× the bound (max error "
                   f"{v['max_abs_error']:.3g})")


def _combine_common(f: Any) -> Any:
    for opt in reversed([
        click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
                     help="Output adapter (folder, or file for kohya/diffusers/gguf)."),
        rank_policy_options,
        click.option("--format", "fmt", type=click.Choice(["peft", "kohya", "diffusers",
                                                           "gguf"]),
                     help="Output format (default: the first input's)."),
        click.option("--base", metavar="BASE",
                     help="Base model: resolves kohya names; GGUF needs its config."),
        click.option("--dtype", type=click.Choice(["keep", "fp32", "bf16", "fp16"]),
                     default="keep", show_default=True,
                     help="dtype of the written factors (keep: the first input's)."),
        click.option("--force", is_flag=True, help="Replace an existing output (never an input)."),
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]):
        f = opt(f)
    return f


def _print_combine(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2, allow_nan=False))
        return
    t = report["totals"]
    click.echo(f"wrote {report['output']}: {report['format']} adapter, {t['lora_modules']} LoRA "
               f"modules, ranks {', '.join(map(str, t['ranks']))}, {t['parameters']:,} "
               f"parameters; method {report['method']}"
               + (f", {report['policy']}" if report["policy"] else "")
               + f"; {report['seconds']:.2f} s")
    if report["method"] != "cat":
        what = "the exact weighted sum" if report["method"] == "svd" else "its dense result"
        click.echo(f"  largest relative error against {what}: "
                   f"{t['max_rel_error']:.4g}")


@cli.command()
@click.argument("adapters", nargs=-1, required=True)
@click.option("--method", required=True, type=click.Choice(
    ["cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]),
    help="cat: exact sum; svd: exact sum recompressed; ties/dare/magnitude_prune: see docs.")
@click.option("--weight", "weights", multiple=True, type=float, metavar="W",
              help="Weight of each adapter's delta, one per adapter in order (default 1).")
@click.option("--density", type=float, default=0.5, show_default=True,
              help="Fraction of entries kept by ties, dare_* and magnitude_prune.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's drops.")
@click.option("--exact-svd", is_flag=True, help="Full SVD when factorising dense results.")
@_combine_common
@click.pass_context
def combine(ctx: click.Context, adapters: tuple[str, ...], method: str, weights: tuple[float, ...], density: float,
            seed: int, exact_svd: bool, out: Path, rank: int | None, energy: float | None,
            max_error: float | None, budget: str | None, max_rank: int | None,
            fmt: str | None, base: str | None, dtype: str, force: bool,
            as_json: bool) -> None:
    """Combine adapters: exact weighted sums (cat), recompressed without dense matrices (svd),
    or TIES / DARE / magnitude pruning.

    \b
    Examples:
      loratool combine style/ task/ --method cat --weight 0.7 --weight 1 -o both/
      loratool combine a/ b/ c/ d/ --method svd --rank 16 -o merged-16/
      loratool combine a/ b/ --method ties --density 0.3 --rank 32 -o ties/
    """
    from .combine import combine as run
    from .policy import RankPolicy

    policy = RankPolicy.from_options(rank, energy, max_error, budget, max_rank)
    _print_combine(run(list(adapters), out, method, weights=list(weights), policy=policy,
                       density=density, seed=seed, fmt=fmt, dtype=dtype, exact_svd=exact_svd,
                       base=base, force=force, progress=_progress(ctx)), as_json)


@cli.command()
@click.argument("adapter")
@_combine_common
@click.pass_context
def resize(ctx: click.Context, adapter: str, out: Path, rank: int | None, energy: float | None,
           max_error: float | None, budget: str | None, max_rank: int | None,
           fmt: str | None, base: str | None, dtype: str, force: bool, as_json: bool) -> None:
    """Reduce an adapter's rank optimally (the truncated SVD of each module's B@A, computed
    from the factors), reporting the error per module.

    \b
    Examples:
      loratool resize ./adapter-r64 --rank 16 -o ./adapter-r16
      loratool resize ./adapter --energy 0.99 -o ./smaller
    """
    from .combine import combine as run
    from .policy import RankPolicy

    policy = RankPolicy.from_options(rank, energy, max_error, budget, max_rank)
    _print_combine(run([adapter], out, "svd", weights=None, policy=policy, fmt=fmt,
                       dtype=dtype, base=base, force=force, resize=True,
                       progress=_progress(ctx)), as_json)


@cli.command()
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@_merge_options
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
    """
    _run_merge(ctx, 1.0, base, adapters, record=not no_record, **kw)


@cli.command()
@click.argument("merged")
@click.argument("adapters", nargs=-1, required=True)
@_merge_options
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
@click.argument("base")
@click.argument("tuned")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output adapter: a folder (peft), a .safetensors file (kohya), a .gguf "
                   "file (gguf).")
@rank_policy_options
@click.option("--target", "targets", multiple=True, metavar="GLOB",
              help="Only tensors whose name matches (repeatable).")
@click.option("--exclude", "excludes", multiple=True, metavar="GLOB",
              help="Leave out tensors whose name matches (repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya", "gguf"]), default="peft",
              show_default=True, help="Output format.")
@click.option("--dtype", type=click.Choice(["keep", "fp32", "bf16", "fp16"]), default="keep",
              show_default=True, help="dtype of the stored factors (keep: the tuned model's).")
@click.option("--exact-svd", is_flag=True, help="Full SVD instead of the randomized one.")
@click.option("--embed-lora", is_flag=True,
              help="Factorise embeddings and lm_head too (default: store them in full).")
@click.option("--skip-full", is_flag=True,
              help="Drop changed tensors that are not LoRA-able (norms) instead of storing "
                   "them in full.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the randomized SVD: the same inputs and seed give the same adapter.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Also write the report as JSON to this file.")
@click.option("--force", is_flag=True, help="Replace an existing output (never an input).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def extract(ctx: click.Context, base: str, tuned: str, out: Path, rank: int | None,
            energy: float | None, max_error: float | None, budget: str | None,
            max_rank: int | None, targets: tuple[str, ...], excludes: tuple[str, ...],
            device: str, fmt: str, dtype: str, exact_svd: bool, embed_lora: bool,
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
    from .extract import extract as run
    from .extract import report_json
    from .policy import RankPolicy

    policy = RankPolicy.from_options(rank, energy, max_error, budget, max_rank)
    report = run(base, tuned, out, policy, targets=list(targets), excludes=list(excludes),
                 device=device, fmt=fmt, exact_svd=exact_svd, embed_lora=embed_lora,
                 skip_full=skip_full, seed=seed, dtype=dtype, force=force,
                 report_path=report_path, progress=_progress(ctx))
    if as_json:
        click.echo(report_json(report))
        return
    from .summary import format_extract

    click.echo(format_extract(report))


@cli.command()
@click.argument("adapter")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output: a folder (PEFT), a .safetensors file or folder (kohya, diffusers), "
                   "a .gguf file or folder (GGUF).")
@click.option("--to", "to", required=True,
              type=click.Choice(["peft", "kohya", "diffusers", "gguf"]), help="Target format.")
@click.option("--base", metavar="BASE",
              help="The base model (path or Hub id): resolves kohya names, gives GGUF its "
                   "architecture, and checks that the adapter fits.")
@click.option("--drop-unsupported", is_flag=True,
              help="Drop what the target format cannot hold (named in the report) instead of "
                   "refusing.")
@click.option("--force", is_flag=True, help="Replace an existing output (never an input).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def convert(adapter: str, out: Path, to: str, base: str | None, drop_unsupported: bool,
            force: bool, as_json: bool) -> None:
    """Convert an adapter between PEFT, kohya, diffusers and llama.cpp GGUF.

    The format of ADAPTER is detected from its content. Lossless where the target can hold the
    adapter; otherwise refused with what would be lost, unless --drop-unsupported.

    \b
    Examples:
      loratool convert ./my-peft-adapter --to kohya -o my-lora.safetensors
      loratool convert my-lora.safetensors --to peft -o ./peft-adapter --base ./sd15/unet
      loratool convert ./my-peft-adapter --to gguf -o adapter.gguf --base meta-llama/Llama-3.2-1B
    """
    from .convert import convert as run

    report = run(adapter, out, to, base=base, force=force, drop=drop_unsupported)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"wrote {report['output']}: {report['format']} adapter, {report['modules']} LoRA "
               f"modules, {report['full_tensors']} full tensors (from {report['source_format']})")
    for lost in report["dropped"]:
        click.echo(f"  dropped (--drop-unsupported): {lost}")
    if report["base_copies_left_out"]:
        click.echo(f"  left out {len(report['base_copies_left_out'])} full tensor(s) equal to "
                   f"the base's ({report['base_copies_left_out'][0]} …): merging them changes "
                   "nothing")
    g = report.get("gguf")
    if g and g["rescaled"]:
        click.echo(f"  adapter.lora.alpha = {g['alpha']:g}; lora_b of {g['rescaled']} modules "
                   "rescaled to share it" + (f" ({len(g['inexact'])} by a factor that is not a "
                                             "power of two: one rounding)" if g["inexact"]
                                             else " (exactly: powers of two)"))
    elif g:
        click.echo(f"  adapter.lora.alpha = {g['alpha']:g}: every module's scale is alpha / "
                   "rank, nothing rescaled")


@cli.command()
@click.argument("base")
@click.argument("adapters", nargs=-1)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output folder: model.onnx (+ model.onnx.data), config, tokenizer files, "
                   "export.json.")
@click.option("--weight", "weights", multiple=True, type=float, metavar="W",
              help="Weight of each adapter, in order (default 1).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's).")
@click.option("--task", type=click.Choice(["auto", "causal-lm", "feature-extraction"]),
              default="auto", show_default=True,
              help="causal-lm exports logits; feature-extraction the last hidden state.")
@click.option("--atol", type=float,
              help="Largest accepted |ONNX − PyTorch| (default 1e-4 for fp32, 2e-2 for fp16).")
@click.option("--with-past", is_flag=True,
              help="Also export prefill.onnx and decode.onnx with a KV cache (causal LMs).")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime check.")
@click.option("--force", is_flag=True, help="Replace an existing output (never an input).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def export(ctx: click.Context, base: str, adapters: tuple[str, ...], out: Path, weights: tuple[float, ...],
           dtype: str, opset: int | None, task: str, atol: float | None, with_past: bool,
           no_verify: bool, force: bool, as_json: bool) -> None:
    """Export BASE with ADAPTERs merged in memory to ONNX, verified in onnxruntime.

    Needs the extra: pip install 'loratool[onnx]'.

    \b
    Examples:
      loratool export ./Llama-3.2-1B ./my-adapter -o ./onnx
      loratool export ./all-MiniLM-L6-v2 ./adapter -o ./onnx --dtype fp16
    """
    from .export import export as run

    report = run(base, list(adapters), out, weights=list(weights), dtype=dtype, opset=opset,
                 task=task, atol=atol, verify=not no_verify, force=force, with_past=with_past,
                 progress=_progress(ctx))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    v = report["verification"]
    click.echo(f"wrote {report['output']}: {', '.join(report['files'])}")
    click.echo(f"  {report['architecture']} ({report['task']}, {report['dtype']}), "
               f"{len(report['adapters'])} adapter(s) merged in memory "
               f"({report['tensors_changed_by_adapters']} tensors); {report['seconds']:.1f} s")
    if v["checked"]:
        click.echo(f"  verified in onnxruntime on shapes {v['shapes']} (one padded): max "
                   f"|ONNX − PyTorch| {v['max_abs_diff']:.3g} ≤ {v['atol']:g}")
    else:
        click.echo("  not verified (--no-verify)")
    past = report.get("with_past")
    if past and past["verification"]["checked"]:
        click.echo(f"  prefill.onnx + decode.onnx (KV cache): a prefill and one decode step "
                   f"match PyTorch's full-sequence logits to "
                   f"{past['verification']['max_abs_diff']:.3g}")


@cli.command()
@click.argument("repo_id")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="Download into this folder (default: the Hub cache).")
@click.option("--revision", help="Branch, tag or commit.")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Only files matching (default: weights, configs, tokenizer, adapter files).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out files matching.")
@click.option("--repo-type", type=click.Choice(["model", "dataset"]), default="model",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def pull(ctx: click.Context, repo_id: str, out: Path | None, revision: str | None,
         include: tuple[str, ...], exclude: tuple[str, ...], repo_type: str,
         as_json: bool) -> None:
    """Download a model or adapter from the Hub and print its local path.

    \b
    Examples:
      loratool pull meta-llama/Llama-3.2-1B
      loratool pull org/adapter --revision v2 -o ./adapter
    """
    from .hub import pull as run

    r = run(repo_id, out, revision=revision, include=list(include), exclude=list(exclude),
            repo_type=repo_type, progress=_progress(ctx).hub_bars)
    click.echo(json.dumps(r, indent=2) if as_json else r["path"])


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to push to (created if missing).")
@click.option("--message", help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out files matching.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push(path: Path, repo_id: str, private: bool, revision: str | None, message: str | None,
         create_pr: bool, include: tuple[str, ...], exclude: tuple[str, ...],
         as_json: bool) -> None:
    """Upload a folder to the Hub in one commit, with a model card; print the commit URL.

    \b
    Examples:
      loratool push ./adapter me/my-adapter --private
      loratool push ./merged me/merged-model --revision v2 --message "rank 32"
    """
    from .hub import push as run

    r = run(path, repo_id, private=private, revision=revision, message=message,
            create_pr=create_pr, include=list(include), exclude=list(exclude))
    click.echo(json.dumps(r, indent=2) if as_json else (r["pr_url"] or r["commit_url"]))


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("loratool-demo"),
              show_default=True, help="Where the demo models and results are written.")
@click.pass_context
def demo(ctx: click.Context, workdir: Path) -> None:
    """Build a small Llama-style model and a fine-tune of it, and run every command on them.

    Nothing is downloaded. Example: loratool demo --workdir /tmp/demo
    """
    from .demo import run_demo

    for section in run_demo(workdir, progress=_progress(ctx)):
        click.echo(section)


def _debug() -> bool:
    return os.environ.get("LORATOOL_DEBUG", "") not in ("", "0")


def _on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM into KeyboardInterrupt so writers remove their temporary output.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI inside the one error boundary."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = cli.main(args=argv, prog_name="loratool", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("loratool: interrupted; no output was left behind", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("loratool: interrupted; no output was left behind", err=True)
        sys.exit(130)
    except click.ClickException as e:  # usage errors: click's message, exit 2
        e.show()
        sys.exit(e.exit_code)
    except LoraToolError as e:
        if _debug():
            traceback.print_exc()
        click.echo(f"loratool: error: {e}", err=True)
        sys.exit(1)
    except BrokenPipeError:
        sys.stderr.close()  # `loratool inspect … | head` is not an error
        sys.exit(0)
    except Exception as e:  # a bug: still one line, unless asked for the traceback
        if _debug():
            traceback.print_exc()
        first = (str(e).splitlines() or [""])[0]
        click.echo(f"loratool: internal error: {type(e).__name__}: {first} (set "
                   "LORATOOL_DEBUG=1 for the traceback, and please report it)", err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)
