"""The command line's shared pieces: option types (a bad value is a usage error, exit 2),
the options several commands share, progress and notes, and terminal-safe printing.

Example::

    @cli.command()
    @rank_policy_options
    @quiet_option
    def resize(...): ...
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .errors import UsageError

FORMATS = ["peft", "kohya", "diffusers", "gguf"]
DTYPES = ["keep", "fp32", "bf16", "fp16"]


class State:
    """Options of the group that every command sees."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet


# --------------------------------------------------------------------------- option types


class Finite(click.ParamType):
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


class Checked(click.ParamType):
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


FINITE = Finite()
BUDGET = Checked("budget", _check_budget)
SIZE = Checked("size", _check_size)
DEVICE = Checked("device", _check_device)
RANK = click.IntRange(min=1)


def set_quiet(ctx: click.Context, param: Any, value: bool) -> None:
    if value:
        state = ctx.find_object(State)
        if state is not None:
            state.quiet = True


quiet_option = click.option("-q", "--quiet", is_flag=True, expose_value=False,
                            callback=set_quiet,
                            help="No progress bars or notes on stderr (as `loratool -q`).")


def progress(ctx: click.Context) -> Any:
    """Drawn bars when a person watches (stderr is a terminal, no --quiet), else silence."""
    from .progress import SILENT, TqdmProgress

    return SILENT if quiet(ctx) or not sys.stderr.isatty() else TqdmProgress()


def quiet(ctx: click.Context) -> bool:
    state = ctx.find_object(State)
    return bool(state and state.quiet)


def notes(ctx: click.Context, notes: list[str]) -> None:
    """Things a user should know about a result, on stderr (not with --quiet)."""
    if not quiet(ctx):
        for note in notes:
            echo(f"loratool: note: {note}", err=True)


def show(report: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]
           ) -> None:
    if as_json:  # JSON escapes control characters itself
        click.echo(json.dumps(report, indent=2, allow_nan=False, default=str))
    else:
        echo(human(report))


def options(*opts: Any) -> Callable[[Any], Any]:
    """Apply several click options in the order written."""
    def wrap(f: Any) -> Any:
        for opt in reversed(opts):
            f = opt(f)
        return f
    return wrap


def output(help_text: str, required: bool = True) -> Any:
    return click.option("-o", "--output", "out", required=required,
                        type=click.Path(path_type=Path), help=help_text)


FORCE = click.option("--force", is_flag=True, help="Replace an existing output (never an input).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
WEIGHTS = click.option("--weight", "weights", multiple=True, type=FINITE, metavar="W",
                       help="Scale of each adapter's delta, one per adapter in order (default "
                            "1; negative allowed).")
rank_policy_options = options(
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


def policy(rank: int | None, energy: float | None, max_error: float | None,
            budget: str | None, max_rank: int | None) -> Any:
    """The rank policy the flags give, or None when none was given."""
    from .policy import RankPolicy

    if all(v is None for v in (rank, energy, max_error, budget, max_rank)):
        return None
    return RankPolicy.from_options(rank, energy, max_error, budget, max_rank)


merge_options = options(
    output("Output model folder."),
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


extract_options = options(
    output("Output adapter: a folder (peft), a .safetensors file (kohya), a .gguf file (gguf); "
            "the suffix chooses the format when --format is not given."),
    rank_policy_options,
    click.option("--target", "targets", multiple=True, metavar="GLOB",
                 help="Only tensors whose name matches (repeatable)."),
    click.option("--exclude", "excludes", multiple=True, metavar="GLOB",
                 help="Leave out tensors whose name matches (repeatable)."),
    click.option("--device", default="auto", show_default=True, type=DEVICE,
                 help="auto, cpu, cuda, cuda:N or mps: where the SVDs run."),
    click.option("--format", "--to", "fmt", type=click.Choice(["peft", "kohya", "gguf"]),
                 help="Output format (default: from -o's suffix, else peft)."),
    click.option("--dtype", type=click.Choice(DTYPES), default="keep", show_default=True,
                 help="dtype of the stored factors (keep: the tuned model's)."),
    click.option("--exact-svd", is_flag=True, help="Full SVD instead of the randomized one."),
    click.option("--embed-lora", is_flag=True,
                 help="Factorise embeddings and lm_head too (default: store them in full)."),
    click.option("--skip-full", is_flag=True,
                 help="Drop changed tensors that are not LoRA-able (norms) instead of storing "
                      "them in full."),
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Seed of the randomized SVD: the same inputs and seed give the same "
                      "adapter."),
    click.option("--report", "report_path", type=click.Path(path_type=Path),
                 help="Also write the report as JSON to this file."),
    FORCE, JSON, quiet_option)


def adapter_out_options(one: bool) -> Callable[[Any], Any]:
    """The output flags combine and resize share (``one``: resize's single input)."""
    source = "the input's" if one else "the first input's"
    return options(
        output("Output adapter: a folder (peft), a .safetensors file (kohya, diffusers) or a "
                ".gguf file; the suffix chooses the format when --format is not given."),
        rank_policy_options,
        click.option("--format", "--to", "fmt", type=click.Choice(FORMATS),
                     help=f"Output format (default: from -o's suffix, else {source})."),
        click.option("--base", metavar="BASE",
                     help="Base model: resolves kohya names; GGUF needs its config."),
        click.option("--dtype", type=click.Choice(DTYPES), default="keep", show_default=True,
                     help=f"dtype of the written factors (keep: {source})."),
        FORCE, JSON, quiet_option)


def file_filters(default: str) -> Callable[[Any], Any]:
    """--include and --exclude: which files of a folder or repo take part."""
    return options(
        click.option("--include", multiple=True, metavar="GLOB",
                     help=f"Only files matching (repeatable; default: {default})."),
        click.option("--exclude", multiple=True, metavar="GLOB",
                     help="Leave out files matching (repeatable)."))


REPO_TYPE = click.option("--repo-type", type=click.Choice(["model", "dataset"]),
                         default="model", show_default=True, help="The kind of Hub repo.")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def safe(text: str) -> str:
    """Text as a terminal may show it: control characters (an escape sequence in a tensor
    name can retitle or clear a terminal) and lone surrogates written as escapes."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def echo(text: str, err: bool = False, nl: bool = True) -> None:
    click.echo(safe(text), err=err, nl=nl)
