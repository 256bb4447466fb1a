"""The command line's kit: option types (a bad value is a usage error, exit 2), the options
several commands share, progress and notes, terminal-safe printing, and the one error
boundary every command runs inside (:func:`run`).

Example::
    @cli.command()
    @rank_policy_options
    @quiet_option
    def resize(...): ...
"""

from __future__ import annotations

import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, TypeVar

import click

from .. import interrupts
from ..errors import LoraToolError, UsageError
from ..headers.gguf import QUANTIZE
from ..options import Options, OutputLog, RankPolicy, parse_budget
from ..progress import SILENT, Progress, TqdmProgress
from ..reports.base import Report
from ..units import parse_size

FORMATS = ["peft", "kohya", "diffusers", "gguf"]
DTYPES = ["keep", "fp32", "bf16", "fp16"]


class State:
    """What one command line sets for its command: --quiet, --no-fsync, and the log of the
    outputs it begins (so that an interrupt can say what it left). A fresh one per command:
    nothing carries over to the next (tests run many in one process)."""

    def __init__(self) -> None:
        self.quiet = False
        self.fsync = True
        self.log = OutputLog()
        self.shown: Progress | None = None  # the command's bars and status line, once asked

    def clear(self) -> None:
        """Take the status line away before anything else is printed."""
        if self.shown is not None:
            self.shown.clear()

    def options(self) -> Options:
        """The options a verb runs with, as this command line sets them."""
        return Options(fsync=self.fsync and Options().fsync, log=self.log)


def state(ctx: click.Context) -> State:
    found = ctx.find_object(State)
    assert found is not None, "commands run inside run(), which makes the State"
    return found


def options_of(ctx: click.Context) -> Options:
    """The options a verb of this command runs with."""
    return state(ctx).options()


# --------------------------------------------------------------------------- option types

class Finite(click.ParamType):
    """A finite float (no nan, no inf), optionally at least ``minimum``."""

    name = "float"

    def __init__(self, minimum: float | None = None) -> None:
        self.minimum = minimum

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
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

    def __init__(self, name: str, check: Callable[[str], object]) -> None:
        self.name = name
        self.check = check

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        try:
            self.check(str(value))
        except UsageError as e:
            self.fail(str(e), param, ctx)
        return str(value)


def _check_budget(text: str) -> None:
    parse_budget(text)


def _check_size(text: str) -> None:
    parse_size(text)


def _check_device(text: str) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", text):
        raise UsageError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")


FINITE = Finite()
BUDGET = Checked("budget", _check_budget)
SIZE = Checked("size", _check_size)
DEVICE = Checked("device", _check_device)
RANK = click.IntRange(min=1)


def set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        state(ctx).quiet = True


quiet_option = click.option("-q", "--quiet", is_flag=True, expose_value=False,
                            callback=set_quiet,
                            help="No progress bars or notes on stderr (as `loratool -q`).")


def progress(ctx: click.Context) -> Progress:
    """Drawn bars when a person watches (stderr is a terminal, no --quiet), else silence;
    one for the whole command, so that its status line is taken away by its first bar."""

    s = state(ctx)
    if s.shown is None:
        s.shown = SILENT if s.quiet or not sys.stderr.isatty() else TqdmProgress()
    return s.shown


def adapters_text(adapters: tuple[str, ...] | list[str]) -> str:
    """``adapter/`` for one, ``3 adapters`` for more."""
    return adapters[0] if len(adapters) == 1 else f"{len(adapters)} adapters"


def starting(ctx: click.Context, what: str) -> None:
    """The command's first line, shown at once (before torch is imported, 1–10 s) where a
    person watches: what it is about to do. Bars and output take its place."""
    progress(ctx).status(safe(f"loratool {ctx.info_name}: {what} …"))


def quiet(ctx: click.Context) -> bool:
    return state(ctx).quiet


def notes(ctx: click.Context, notes: list[str]) -> None:
    """Things a user should know about a result, on stderr (not with --quiet)."""
    state(ctx).clear()
    if not quiet(ctx):
        for note in notes:
            echo(f"loratool: note: {note}", err=True)


def show(ctx: click.Context, report: Report, as_json: bool) -> None:
    """A verb's report: its JSON (``--json``), or its text."""
    state(ctx).clear()
    if as_json:  # JSON escapes control characters itself
        click.echo(report.to_json())
    else:
        echo(report.render())


F = TypeVar("F", bound=Callable[..., object])


def options(*opts: Callable[[F], F]) -> Callable[[F], F]:
    """Apply several click options in the order written."""
    def wrap(f: F) -> F:
        for opt in reversed(opts):
            f = opt(f)
        return f
    return wrap


def _expect(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None:  # an interrupt before anything is written can name it
        state(ctx).log.expected.append(Path(value))
    return value


def output(help_text: str, required: bool = True) -> Callable[[F], F]:
    return click.option("-o", "--output", "out", required=required, callback=_expect,
                        type=click.Path(path_type=Path), help=help_text)


def _no_fsync(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        state(ctx).fsync = False


FORCE = options(
    click.option("--force", is_flag=True, help="Replace an existing output (never an input)."),
    click.option("--no-fsync", is_flag=True, expose_value=False, callback=_no_fsync,
                 help="Do not flush the output to disk before publishing it (scratch work: "
                      "faster, but a power cut may leave it incomplete)."))


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
            budget: str | None, max_rank: int | None) -> RankPolicy | None:
    """The rank policy the flags give, or None when none was given."""

    if all(v is None for v in (rank, energy, max_error, budget, max_rank)):
        return None
    return RankPolicy.from_options(rank, energy, max_error, budget, max_rank)


GGUF_QUANT = QUANTIZE  # the types a GGUF merge writes (headers.gguf: torch-free)

merge_options = options(
    output("Output model folder (a .gguf file for a GGUF base)."),
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
                      "before it is published (GGUF: read the file back and check every "
                      "tensor's bytes)."),
    click.option("--quant", type=click.Choice(GGUF_QUANT), metavar="TYPE",
                 help="GGUF bases: write changed tensors as TYPE (" + ", ".join(GGUF_QUANT)
                      + ") instead of their own type."),
    FORCE, JSON, quiet_option)

# which tensors, and where their SVDs run: extract and analyze alike
svd_selection = options(
    click.option("--target", "targets", multiple=True, metavar="GLOB",
                 help="Only tensors whose name matches (repeatable)."),
    click.option("--exclude", "excludes", multiple=True, metavar="GLOB",
                 help="Leave out tensors whose name matches (repeatable)."),
    click.option("--device", default="auto", show_default=True, type=DEVICE,
                 help="auto, cpu, cuda, cuda:N or mps: where the SVDs run."))


extract_options = options(
    output("Output adapter: a folder (peft), a .safetensors file (kohya), a .gguf file (gguf); "
            "the suffix chooses the format when --format is not given."),
    rank_policy_options,
    svd_selection,
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


analyze_options = options(
    click.option("--base", metavar="BASE",
                 help="The base an ADAPTER is for: gives the amplification factor its W, and "
                      "resolves kohya names."),
    click.option("--compare", is_flag=True,
                 help="PATHS are two adapters: the subspace similarity of each module."),
    click.option("--subspace", type=click.Choice(["a", "delta"]), default="a",
                 show_default=True,
                 help="--compare's subspaces: the A factors' right-singular vectors (the LoRA "
                      "paper's), or ΔW's input directions (the same however the factors are "
                      "split)."),
    click.option("--energy", "energies", multiple=True,
                 type=click.FloatRange(0, 1, min_open=True), metavar="F",
                 help="Give the rank that keeps this share of ‖ΔW‖² (repeatable; default 0.5, "
                      "0.9 and 0.99)."),
    click.option("--rank", type=RANK,
                 help="Rank of the amplification factor and the mark on the error curves "
                      "(default: each module's rank at the middle --energy, or its own)."),
    click.option("--max-rank", type=RANK, default=256, show_default=True,
                 help="Singular values computed at most per module (more only when an energy "
                      "needs them)."),
    svd_selection,
    click.option("--exact-svd", is_flag=True, help="Full SVD instead of the randomized one."),
    click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Seed of the randomized SVD and of the random directions."),
    click.option("--plot", type=click.Path(path_type=Path), metavar="DIR",
                 help="Write the figures as PNGs into this folder (pip install "
                      "'loratool[plot]')."),
    click.option("--html", type=click.Path(path_type=Path), metavar="FILE",
                 help="Write one self-contained page with the tables and figures."),
    FORCE, JSON, quiet_option)


def adapter_out_options(one: bool) -> Callable[[F], F]:
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


def file_filters(default: str) -> Callable[[F], F]:
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


# --------------------------------------------------------------------------- the boundary

def _debug() -> bool:
    return os.environ.get("LORATOOL_DEBUG", "") not in ("", "0")


def _error(message: str, code: int) -> None:
    """One line on stderr, whatever a name in it holds, and exit."""
    echo(message.replace("\n", "\\n").replace("\r", "\\r"), err=True)
    sys.exit(code)


def run(cli: click.Group, argv: list[str] | None) -> None:
    """The one error boundary: every expected failure is one line and exit 1 (usage: 2),
    an interrupt 130, a bug one line naming it (LORATOOL_DEBUG=1: the traceback)."""

    program = argv is None
    interrupts.reset()
    interrupts.install(armed=False)
    command = State()  # this command's flags and outputs, never the last one's
    try:
        interrupts.arm()  # inside the boundary: from here an interrupt is caught below
        rc = cli.main(args=argv, prog_name="loratool", standalone_mode=False, obj=command)
        interrupts.check_interrupted()  # an interrupt something swallowed is still one
    except (click.exceptions.Abort, KeyboardInterrupt):
        command.clear()
        _interrupted(program, command.log)
    except click.UsageError as e:  # click's: the same one line as a verb's usage error
        command.clear()
        where = e.ctx.command_path if e.ctx is not None else "loratool"
        _error(f"loratool: usage error: {e.format_message()} (see `{where} -h`)",
               e.exit_code)
    except click.ClickException as e:
        command.clear()
        _error(f"loratool: error: {e.format_message()}", e.exit_code)
    except UsageError as e:  # options that cannot work together, found by a verb
        command.clear()
        _error(f"loratool: usage error: {e}", 2)
    except LoraToolError as e:
        command.clear()
        if _debug():
            traceback.print_exc()
        _error(f"loratool: error: {e}", 1)
    except BrokenPipeError:
        sys.stderr.close()  # `loratool inspect … | head` is not an error
        sys.exit(0)
    except Exception as e:  # a bug: still one line, unless asked for the traceback
        command.clear()
        if interrupts.interrupted():  # e.g. an import cut short by Ctrl-C
            _interrupted(program, command.log)
        if _debug():
            traceback.print_exc()
        if isinstance(e, OSError) and e.errno is not None:  # what no verb mapped: still one line
            where = f"{e.filename}: " if e.filename else ""
            _error(f"loratool: error: {where}{e.strerror or e}", 1)
        first = (str(e).splitlines() or [""])[0]
        _error(f"loratool: internal error: {type(e).__name__}: {first} (set LORATOOL_DEBUG=1 "
               "for the traceback, and please report it)", 1)
    command.clear()
    if program:
        interrupts.done()  # the work is done and published: a late Ctrl-C changes nothing
    sys.exit(rc if isinstance(rc, int) else 0)


def _interrupted(program: bool, log: OutputLog) -> None:
    """Exit 130. The program exits at once: the temporary output is already removed, and
    interpreter teardown after an interrupted import can end the process by SIGINT instead
    of this exit code."""

    echo(f"loratool: interrupted; {log.outcome()}", err=True)
    if not program:
        sys.exit(130)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
