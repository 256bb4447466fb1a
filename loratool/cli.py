"""The command line: a thin click group, and the one error boundary in :func:`main`.

Commands parse flags (ranges and forms are checked by click's types: a bad value is a usage
error, exit 2), call a verb, and print what ``render.py`` makes of its report. Only this module
prints.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import LoraToolError, UsageError

FORMATS = ["peft", "kohya", "diffusers", "gguf"]
DTYPES = ["keep", "fp32", "bf16", "fp16"]


class State:
    """Options of the group that every command sees."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet


# --------------------------------------------------------------------------- option types


class _Finite(click.ParamType):
    """A finite float (no nan, no inf), optionally at least ``minimum``."""

    name = "float"

    def __init__(self, minimum: float | None = None) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.minimum is not None and x < self.minimum:
            self.fail(f"{value!r} is below {self.minimum:g}", param, ctx)
        return x


class _Checked(click.ParamType):
    """A string that a loratool parser accepts (sizes, budgets, devices); kept as typed."""

    def __init__(self, name: str, check: Callable[[str], Any]) -> None:
        self.name = name
        self.check = check

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        try:
            self.check(str(value))
        except UsageError as e:
            self.fail(str(e), param, ctx)
        return str(value)


def _check_budget(text: str) -> None:
    from .policy import parse_budget

    parse_budget(text)


def _check_size(text: str) -> None:
    from .units import parse_size

    parse_size(text)


def _check_device(text: str) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", text):
        raise UsageError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")


FINITE = _Finite()
BUDGET = _Checked("budget", _check_budget)
SIZE = _Checked("size", _check_size)
DEVICE = _Checked("device", _check_device)
RANK = click.IntRange(min=1)


def _set_quiet(ctx: click.Context, param: Any, value: bool) -> None:
    if value:
        state = ctx.find_object(State)
        if state is not None:
            state.quiet = True


quiet_option = click.option("-q", "--quiet", is_flag=True, expose_value=False,
                            callback=_set_quiet,
                            help="No progress bars or notes on stderr (as `loratool -q`).")


def _progress(ctx: click.Context) -> Any:
    """Drawn bars when a person watches (stderr is a terminal, no --quiet), else silence."""
    from .progress import SILENT, TqdmProgress

    return SILENT if _quiet(ctx) or not sys.stderr.isatty() else TqdmProgress()


def _quiet(ctx: click.Context) -> bool:
    state = ctx.find_object(State)
    return bool(state and state.quiet)


def _notes(ctx: click.Context, notes: list[str]) -> None:
    """Things a user should know about a result, on stderr (not with --quiet)."""
    if not _quiet(ctx):
        for note in notes:
            _echo(f"loratool: note: {note}", err=True)


def _print(report: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]
           ) -> None:
    if as_json:  # JSON escapes control characters itself
        click.echo(json.dumps(report, indent=2, allow_nan=False, default=str))
    else:
        _echo(human(report))


def _options(*opts: Any) -> Callable[[Any], Any]:
    """Apply several click options in the order written."""
    def wrap(f: Any) -> Any:
        for opt in reversed(opts):
            f = opt(f)
        return f
    return wrap


def _output(help_text: str, required: bool = True) -> Any:
    return click.option("-o", "--output", "out", required=required,
                        type=click.Path(path_type=Path), help=help_text)


FORCE = click.option("--force", is_flag=True, help="Replace an existing output (never an input).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
WEIGHTS = click.option("--weight", "weights", multiple=True, type=FINITE, metavar="W",
                       help="Scale of each adapter's delta, one per adapter in order (default "
                            "1; negative allowed).")
rank_policy_options = _options(
    click.option("--rank", type=RANK, help="Fixed rank (default 16), capped at min(out, in)."),
    click.option("--energy", type=click.FloatRange(0, 1, min_open=True), metavar="F",
                 help="Smallest rank keeping a fraction F of Σσ² per module, 0 < F ≤ 1."),
    click.option("--max-error", type=click.FloatRange(0, 1, max_open=True), metavar="E",
                 help="Smallest rank whose measured relative error ‖ΔW − BA‖/‖ΔW‖ ≤ E, per "
                      "module (a guarantee), 0 ≤ E < 1."),
    click.option("--budget", type=BUDGET, metavar="P",
                 help="Total adapter parameters (5000000) or bytes of the dtype written "
                      "(50MB), split across modules to minimise the total squared error."),
    click.option("--max-rank", type=RANK, metavar="N", help="Cap on any policy's rank."))


def _policy(rank: int | None, energy: float | None, max_error: float | None,
            budget: str | None, max_rank: int | None) -> Any:
    """The rank policy the flags give, or None when none was given."""
    from .policy import RankPolicy

    if all(v is None for v in (rank, energy, max_error, budget, max_rank)):
        return None
    return RankPolicy.from_options(rank, energy, max_error, budget, max_rank)


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
    from .checkpoint import open_checkpoint
    from .render import format_compare, format_summary
    from .summary import compare, summarize

    progress = _progress(ctx)
    ckpt = open_checkpoint(path, progress)
    data = summarize(ckpt, list(filters) or None)
    cmp = None
    if against:
        cmp = compare(ckpt, open_checkpoint(against, progress), list(filters) or None,
                      progress=progress)
        data["compare"] = cmp
    if as_json:
        click.echo(json.dumps(data, indent=2, allow_nan=False))  # escapes control characters
        return
    _echo(format_summary(data, expand=expand))
    if cmp is not None:
        _echo("")
        _echo(format_compare(data, cmp, expand=expand))


@cli.command()
@click.argument("base")
@click.argument("tuned")
@_output("Output adapter: a folder (peft), a .safetensors file (kohya), a .gguf file (gguf); "
         "the suffix chooses the format when --format is not given.")
@rank_policy_options
@click.option("--target", "targets", multiple=True, metavar="GLOB",
              help="Only tensors whose name matches (repeatable).")
@click.option("--exclude", "excludes", multiple=True, metavar="GLOB",
              help="Leave out tensors whose name matches (repeatable).")
@click.option("--device", default="auto", show_default=True, type=DEVICE,
              help="auto, cpu, cuda, cuda:N or mps: where the SVDs run.")
@click.option("--format", "--to", "fmt", type=click.Choice(["peft", "kohya", "gguf"]),
              help="Output format (default: from -o's suffix, else peft).")
@click.option("--dtype", type=click.Choice(DTYPES), default="keep", show_default=True,
              help="dtype of the stored factors (keep: the tuned model's).")
@click.option("--exact-svd", is_flag=True, help="Full SVD instead of the randomized one.")
@click.option("--embed-lora", is_flag=True,
              help="Factorise embeddings and lm_head too (default: store them in full).")
@click.option("--skip-full", is_flag=True,
              help="Drop changed tensors that are not LoRA-able (norms) instead of storing "
                   "them in full.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the randomized SVD: the same inputs and seed give the same adapter.")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Also write the report as JSON to this file.")
@FORCE
@JSON
@quiet_option
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
    from .extract import extract as run
    from .policy import RankPolicy
    from .render import format_extract

    policy = RankPolicy.from_options(rank, energy, max_error, budget, max_rank)
    report = run(base, tuned, out, policy, targets=list(targets), excludes=list(excludes),
                 device=device, fmt=fmt, exact_svd=exact_svd, embed_lora=embed_lora,
                 skip_full=skip_full, seed=seed, dtype=dtype, force=force,
                 report_path=report_path, progress=_progress(ctx))
    _print(report, as_json, format_extract)
    _notes(ctx, report["notes"])


merge_options = _options(
    _output("Output model folder."),
    WEIGHTS,
    click.option("--device", default="auto", show_default=True, type=DEVICE,
                 help="auto, cpu, cuda, cuda:N or mps: where the math runs."),
    click.option("--dtype", type=click.Choice(DTYPES), default="keep", show_default=True,
                 help="Output dtype of float tensors."),
    click.option("--max-shard-size", default="5GB", show_default=True, type=SIZE,
                 help="Cut output shards at this size (5GB, 500MB, 2GiB)."),
    click.option("--untie", is_flag=True,
                 help="An adapter on a tied lm_head: write a separate lm_head instead of "
                      "refusing."),
    click.option("--verify", is_flag=True,
                 help="Check every changed tensor of the output against a float64 reference "
                      "before it is published."),
    FORCE, JSON, quiet_option)


def _run_merge(ctx: click.Context, sign: float, base: str, adapters: tuple[str, ...],
               out: Path, weights: tuple[float, ...], device: str, dtype: str,
               max_shard_size: str, untie: bool, verify: bool, force: bool,
               as_json: bool, record: bool = True) -> None:
    from .merge import run
    from .render import format_merge

    _print(run(base, list(adapters), out, weights=list(weights), sign=sign, device=device,
               dtype=dtype, max_shard_size=max_shard_size, force=force, untie=untie,
               verify=verify, record=record, progress=_progress(ctx)), as_json, format_merge)


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


def _adapter_out_options(one: bool) -> Callable[[Any], Any]:
    """The output flags combine and resize share (``one``: resize's single input)."""
    source = "the input's" if one else "the first input's"
    return _options(
        _output("Output adapter: a folder (peft), a .safetensors file (kohya, diffusers) or a "
                ".gguf file; the suffix chooses the format when --format is not given."),
        rank_policy_options,
        click.option("--format", "--to", "fmt", type=click.Choice(FORMATS),
                     help=f"Output format (default: from -o's suffix, else {source})."),
        click.option("--base", metavar="BASE",
                     help="Base model: resolves kohya names; GGUF needs its config."),
        click.option("--dtype", type=click.Choice(DTYPES), default="keep", show_default=True,
                     help=f"dtype of the written factors (keep: {source})."),
        FORCE, JSON, quiet_option)


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
@_adapter_out_options(one=False)
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
    from .combine import combine as run
    from .render import format_combine

    policy = _policy(rank, energy, max_error, budget, max_rank)
    report = run(list(adapters), out, method, weights=list(weights), policy=policy,
                 density=density, seed=seed, fmt=fmt, dtype=dtype, exact_svd=exact_svd,
                 base=base, force=force, progress=_progress(ctx))
    _print(report, as_json, format_combine)
    _notes(ctx, report["notes"])


@cli.command()
@click.argument("adapter")
@_adapter_out_options(one=True)
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
    from .combine import combine as run
    from .render import format_combine

    policy = _policy(rank, energy, max_error, budget, max_rank)
    report = run([adapter], out, "svd", weights=None, policy=policy, fmt=fmt, dtype=dtype,
                 base=base, force=force, resize=True, progress=_progress(ctx))
    _print(report, as_json, format_combine)
    _notes(ctx, report["notes"])


@cli.command()
@click.argument("adapter")
@_output("Output: a folder (PEFT), a .safetensors file or folder (kohya, diffusers), a .gguf "
         "file or folder (GGUF).")
@click.option("--format", "--to", "to", required=True, type=click.Choice(FORMATS),
              help="Target format.")
@click.option("--base", metavar="BASE",
              help="The base model (path or Hub id): resolves kohya names, gives GGUF its "
                   "architecture, and checks that the adapter fits.")
@click.option("--drop-unsupported", is_flag=True,
              help="Drop what the target format cannot hold (named in the report) instead of "
                   "refusing.")
@FORCE
@JSON
@quiet_option
def convert(adapter: str, out: Path, to: str, base: str | None, drop_unsupported: bool,
            force: bool, as_json: bool) -> None:
    """Convert an adapter between PEFT, kohya, diffusers and llama.cpp GGUF.

    The format of ADAPTER is detected from its content. Lossless where the target can hold the
    adapter; otherwise refused with what would be lost, unless --drop-unsupported.

    \b
    Examples:
      loratool convert ./my-peft-adapter --format kohya -o my-lora.safetensors
      loratool convert my-lora.safetensors --format peft -o ./peft-adapter --base ./sd15/unet
      loratool convert ./my-peft-adapter --format gguf -o adapter.gguf --base org/Llama-3.2-1B
    """
    from .convert import convert as run
    from .render import format_convert

    _print(run(adapter, out, to, base=base, force=force, drop=drop_unsupported), as_json,
           format_convert)


@cli.command()
@click.argument("base")
@click.argument("adapters", nargs=-1)
@_output("Output folder: model.onnx (+ model.onnx.data), config, tokenizer files, "
         "export.json.")
@WEIGHTS
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of the graph's weights and activations (bf16 does not run on "
                   "onnxruntime's CPU provider).")
@click.option("--opset", type=click.IntRange(min=1), help="ONNX opset (default: the "
              "exporter's, 18); the graph is checked to have it.")
@click.option("--task", type=click.Choice(["auto", "causal-lm", "feature-extraction"]),
              default="auto", show_default=True,
              help="causal-lm exports logits; feature-extraction the last hidden state.")
@click.option("--atol", type=_Finite(minimum=0.0),
              help="Largest accepted |ONNX − PyTorch| (default 1e-4 for fp32, 2e-2 for fp16).")
@click.option("--with-past", is_flag=True,
              help="Also export prefill.onnx and decode.onnx with a KV cache (causal LMs).")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime check.")
@FORCE
@JSON
@quiet_option
@click.pass_context
def export(ctx: click.Context, base: str, adapters: tuple[str, ...], out: Path,
           weights: tuple[float, ...], dtype: str, opset: int | None, task: str,
           atol: float | None, with_past: bool, no_verify: bool, force: bool,
           as_json: bool) -> None:
    """Export BASE with ADAPTERs merged in memory to ONNX, verified in onnxruntime.

    Needs the extra: pip install 'loratool[onnx]'.

    \b
    Examples:
      loratool export ./Llama-3.2-1B ./my-adapter -o ./onnx
      loratool export ./all-MiniLM-L6-v2 ./adapter -o ./onnx --dtype fp16
    """
    from .export import export as run
    from .render import format_export

    _print(run(base, list(adapters), out, weights=list(weights), dtype=dtype, opset=opset,
               task=task, atol=atol, verify=not no_verify, force=force, with_past=with_past,
               progress=_progress(ctx)), as_json, format_export)


REPO_TYPE = click.option("--repo-type", type=click.Choice(["model", "dataset"]),
                         default="model", show_default=True, help="The kind of Hub repo.")


@cli.command()
@click.argument("repo_id")
@_output("Download into this folder (default: the Hub cache).", required=False)
@click.option("--revision", help="Branch, tag or commit.")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Only files matching (default: weights, configs, tokenizer, adapter files).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out files matching.")
@REPO_TYPE
@FORCE
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
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
    from .hub import pull as run

    r = run(repo_id, out, revision=revision, include=list(include), exclude=list(exclude),
            repo_type=repo_type, force=force, progress=_progress(ctx))
    _echo(json.dumps(r, indent=2) if as_json else r["path"])


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to push to (created if missing).")
@click.option("--message", help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out files matching.")
@REPO_TYPE
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
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
    from .hub import push as run

    r = run(path, repo_id, private=private, revision=revision, message=message,
            create_pr=create_pr, include=list(include), exclude=list(exclude),
            repo_type=repo_type, progress=_progress(ctx))
    _echo(json.dumps(r, indent=2) if as_json else (r["pr_url"] or r["commit_url"]))


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("loratool-demo"),
              show_default=True, help="Where the demo models and results are written.")
@quiet_option
@click.pass_context
def demo(ctx: click.Context, workdir: Path) -> None:
    """Build a small Llama-style model and a fine-tune of it, and run every command on them.

    Nothing is downloaded. Example: loratool demo --workdir /tmp/demo
    """
    from .demo import run_demo

    for section in run_demo(workdir, progress=_progress(ctx)):
        _echo(section)


# --------------------------------------------------------------------------- the boundary


def _debug() -> bool:
    return os.environ.get("LORATOOL_DEBUG", "") not in ("", "0")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: str) -> str:
    """Text as a terminal may show it: control characters (an escape sequence in a tensor
    name can retitle or clear a terminal) and lone surrogates written as escapes."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _echo(text: str, err: bool = False, nl: bool = True) -> None:
    click.echo(safe(text), err=err, nl=nl)


def _error(message: str, code: int) -> None:
    """One line on stderr, whatever a name in it holds, and exit."""
    _echo(message.replace("\n", "\\n").replace("\r", "\\r"), err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI inside the one error boundary. ``argv`` given (a caller in
    Python, such as the tests): an interrupt raises SystemExit(130) instead of ending the
    process at once."""
    from . import interrupts

    program = argv is None
    interrupts.install()
    try:
        rc = cli.main(args=argv, prog_name="loratool", standalone_mode=False)
        interrupts.check_interrupted()  # an interrupt something swallowed is still one
    except (click.exceptions.Abort, KeyboardInterrupt):
        _interrupted(program)
    except click.ClickException as e:  # usage errors: click's message, exit 2
        import io

        buf = io.StringIO()
        e.show(file=buf)
        _echo(buf.getvalue(), err=True, nl=False)
        sys.exit(e.exit_code)
    except UsageError as e:  # options that cannot work together, found by a verb
        _error(f"loratool: usage error: {e}", 2)
    except LoraToolError as e:
        if _debug():
            traceback.print_exc()
        _error(f"loratool: error: {e}", 1)
    except BrokenPipeError:
        sys.stderr.close()  # `loratool inspect … | head` is not an error
        sys.exit(0)
    except Exception as e:  # a bug: still one line, unless asked for the traceback
        if interrupts.interrupted():  # e.g. an import cut short by Ctrl-C
            _interrupted(program)
        if _debug():
            traceback.print_exc()
        if isinstance(e, OSError) and e.errno is not None:  # what no verb mapped: still one line
            where = f"{e.filename}: " if e.filename else ""
            _error(f"loratool: error: {where}{e.strerror or e}", 1)
        first = (str(e).splitlines() or [""])[0]
        _error(f"loratool: internal error: {type(e).__name__}: {first} (set LORATOOL_DEBUG=1 "
               "for the traceback, and please report it)", 1)
    if program:
        interrupts.done()  # the work is done and published: a late Ctrl-C changes nothing
    sys.exit(rc if isinstance(rc, int) else 0)


def _interrupted(program: bool) -> None:
    """Exit 130. The program exits at once: the temporary output is already removed, and
    interpreter teardown after an interrupted import can end the process by SIGINT instead
    of this exit code."""
    _echo("loratool: interrupted; no output was left behind", err=True)
    if not program:
        sys.exit(130)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
