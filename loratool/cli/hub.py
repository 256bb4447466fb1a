"""``loratool pull`` and ``push``: the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import click

from .kit import (
    FORCE,
    JSON,
    REPO_TYPE,
    file_filters,
    options_of,
    output,
    progress,
    quiet_option,
    show,
    starting,
)


@click.command()
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
    starting(ctx, f"downloading {repo_id}")
    from ..verbs.hub import pull as verb

    show(ctx, verb(repo_id, out, revision=revision, include=list(include), exclude=list(exclude),
              repo_type=repo_type, force=force, options=options_of(ctx),
              progress=progress(ctx)), as_json)


@click.command()
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
    starting(ctx, f"uploading {path} to {repo_id}")
    from ..verbs.hub import push as verb

    show(ctx, verb(path, repo_id, private=private, revision=revision, message=message,
              create_pr=create_pr, include=list(include), exclude=list(exclude),
              repo_type=repo_type, progress=progress(ctx)), as_json)
