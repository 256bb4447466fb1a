"""``loratool pull`` and ``push``: the Hugging Face Hub, with proper model cards.

Both go through ``huggingface_hub`` (its cache, ``HF_TOKEN``, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``); errors become one line each (``sources.hub_errors``), and the token never
appears in them. ``pull`` downloads only weights, configs, tokenizer and adapter files unless
told otherwise, and refuses file names that would escape the target folder. ``push`` uploads a
folder in one commit, writing the model card in the commit (the local folder is not changed).

Example::
    pull("org/adapter", "adapter/").path
    push("adapter/", "me/my-adapter", private=True).commit_url
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path, PurePosixPath

import yaml

from ..errors import HubError, InputError
from ..formats import detect
from ..headers import sources
from ..headers.sources import CONFIG_PATTERNS, hub, hub_errors, hub_repo_of
from ..io.staging import Stage, check_output
from ..io.tensors import open_checkpoint
from ..options import Options
from ..progress import SILENT, Progress
from ..reports.base import JsonValue
from ..reports.hub import PullReport, PushReport

# what a command reads of a repo besides weights, the model card, and (patterns match across
# folders) the same in subfolders
CONFIG_FILES = CONFIG_PATTERNS + ["README.md", "*/tokenizer*"]
NOT_PULLED = ["optimizer.pt", "scheduler.pt", "rng_state*.pth", "training_args.bin",
              "*/optimizer.pt"]


NEVER_PUSHED = (".partial", ".old", ".pyc", ".tmp", "~", ".incomplete", ".lock", ".swp")


def default_patterns(names: list[str] | None) -> list[str]:
    """Configs, tokenizer and adapter files, and one copy of the weights: safetensors when the
    repo has them, pickles only when it has nothing else (never both)."""
    if names is not None and not any(n.endswith(".safetensors") for n in names):
        return CONFIG_FILES + ["*.bin", "*.pt", "*.pth", "*/*.bin"]
    return CONFIG_FILES + ["*.safetensors", "*/*.safetensors"]


def _check_names(names: list[str], repo: str) -> None:
    for n in names:
        p = PurePosixPath(n)
        if p.is_absolute() or ".." in p.parts or "\\" in n:
            raise HubError(f"{repo}: holds a file named {n!r}, which would land outside the "
                           "target folder; refusing to download")


def pull(repo_id: str, out: str | os.PathLike[str] | None = None, *,
         revision: str | None = None, include: list[str] | None = None,
         exclude: list[str] | None = None, repo_type: str = "model", force: bool = False,
         options: Options | None = None, progress: Progress = SILENT) -> PullReport:
    """Download a repo (its weights, configs, tokenizer and adapter files by default, or the
    ``include`` globs) into the Hub cache, or into ``out``, where the files arrive all at once
    (downloaded beside it and moved into place).

    Example::

        path = loratool.pull("org/adapter", revision="v2").path
    """

    parsed = sources.parse_hub_id(repo_id)
    if parsed is None:
        raise InputError(f"{repo_id}: not a Hub id (org/name or org/name@revision)")
    repo_id, at = parsed
    revision = revision or at
    out = Path(out) if out is not None else None
    if out is not None:
        check_output(out, [], force)
    where = f"{repo_id}@{revision}" if revision else repo_id
    progress.clear()  # the Hub's own bars take the line
    if out is None:
        root = _download(repo_id, revision, repo_type, include, exclude, None, where,
                         progress.hub_bars)
    else:
        with Stage(out, [], force, options=options) as stage:
            assert stage.tmp is not None
            _download(repo_id, revision, repo_type, include, exclude, stage.tmp, where,
                      progress.hub_bars)
            shutil.rmtree(stage.tmp / ".cache", ignore_errors=True)  # the download's records
            stage.publish()
        root = out
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if p.is_file() and ".cache" not in p.parts)
    return PullReport(repo=repo_id, revision=revision, path=str(root), files=files)


def _download(repo_id: str, revision: str | None, repo_type: str, include: list[str] | None,
              exclude: list[str] | None, local_dir: Path | None, where: str, bars: bool
              ) -> Path:
    hf = hub()
    with hub_errors(where, revision, bars):
        names = None
        if not hf.constants.HF_HUB_OFFLINE:
            names = hf.list_repo_files(repo_id, revision=revision, repo_type=repo_type)
            _check_names(names, where)
        patterns = list(include or default_patterns(names))
        return Path(hf.snapshot_download(repo_id, revision=revision, repo_type=repo_type,
                                         allow_patterns=patterns,
                                         ignore_patterns=list(exclude or []) + NOT_PULLED,
                                         local_dir=str(local_dir) if local_dir else None))


def _hub_base(spec: object) -> tuple[str | None, str | None]:
    """(repo id, revision) when ``spec`` names a Hub repo; local paths are not Hub ids."""

    return (hub_repo_of(spec) if isinstance(spec, str) else None) or (None, None)


def card_metadata(folder: Path) -> tuple[dict[str, JsonValue], str]:
    """YAML metadata and a short description for the folder's model card."""

    meta: dict[str, JsonValue] = {}
    try:
        ckpt = open_checkpoint(folder)
    except Exception:  # not weights loratool reads: upload as is, with a minimal card
        return {"tags": ["loratool"]}, "Uploaded with loratool."
    kind, fmt = detect(ckpt)
    if kind == "adapter":
        cfg = ckpt.adapter_config or {}
        base, at = _hub_base(cfg.get("base_model_name_or_path"))
        if base:
            meta["base_model"] = base
            meta["base_model_relation"] = "adapter"
        meta["library_name"] = "peft" if fmt == "peft" else "diffusers" if fmt == "diffusers" \
            else None
        meta["tags"] = ["lora", "loratool"]
        revision = cfg.get("revision") or at
        text = f"LoRA adapter ({fmt})" + (f" for [{base}](https://huggingface.co/{base})"
                                           if base else "") + \
            (f", base revision `{revision}`" if revision else "") + "."
    else:
        info = ckpt.metadata
        meta["tags"] = ["loratool"]
        meta["library_name"] = "transformers" if ckpt.config else None
        text = "Model weights."
        if info.get("loratool") == "merge" and info.get("loratool.base"):
            hub_base, _ = _hub_base(info["loratool.base"])
            if hub_base:
                meta["base_model"] = hub_base
                meta["base_model_relation"] = "merge"
            adapters = json.loads(info.get("loratool.adapters", "[]"))
            text = (f"Merged by loratool: base `{info['loratool.base']}` with the adapters "
                    + ", ".join(f"`{a['adapter']}` × {a['weight']:g}" for a in adapters) + ".")
    return {k: v for k, v in meta.items() if v is not None}, text


def model_card(folder: Path) -> str:
    """The README.md to push: the folder's own card with its metadata brought up to date, or a
    new one."""
    hf = hub()
    meta, text = card_metadata(folder)
    readme = folder / "README.md"
    if readme.is_file():
        card = hf.ModelCard(readme.read_text(encoding="utf-8"))
        data = {k: v for k, v in card.data.to_dict().items() if v not in (None, "", [])}
        tags = list(dict.fromkeys((data.get("tags") or []) + meta.pop("tags", [])))
        data.update(meta)
        if not _hub_base(data.get("base_model"))[0]:  # a local path or nothing: drop it
            data.pop("base_model", None)
            data.pop("base_model_relation", None)
            tags = [t for t in tags if not str(t).startswith("base_model:")]
        data["tags"] = [t for t in tags if not str(t).endswith(":")]  # e.g. "base_model:adapter:"
        body = card.text
        if text not in body:
            body = f"\n{text}\n{body}"
        return hf.ModelCard(f"---\n{_yaml(data)}---\n{body}").content
    return f"---\n{_yaml(meta)}---\n\n# {folder.name}\n\n{text}\n"


def _yaml(data: dict[str, JsonValue]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _files(folder: Path, include: list[str], exclude: list[str]) -> list[Path]:
    out = []
    root = Path(os.path.realpath(folder))
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue  # hidden files, .cache, temporary .partial folders
        if rel.endswith(NEVER_PUSHED) or rel == "README.md":
            continue
        if include and not any(fnmatch.fnmatch(rel, g) for g in include):
            continue
        if any(fnmatch.fnmatch(rel, g) for g in exclude):
            continue
        target = Path(os.path.realpath(p))
        if not target.is_relative_to(root) and not _in_hub_cache(target):
            # a link out of the folder (a Hub cache snapshot's links into its blobs are fine)
            raise InputError(f"{p}: links to {target}, outside the folder; refusing to upload "
                             "it (--exclude it, or copy the file in)")
        out.append(p)
    return out


def _in_hub_cache(target: Path) -> bool:
    """A file in the real Hub cache's blob store (``<cache>/models--org--name/blobs/…``): what
    the links of a downloaded snapshot point at. Any other folder named blobs is not."""
    cache = Path(os.path.realpath(hub().constants.HF_HUB_CACHE))
    if not target.is_relative_to(cache):
        return False
    parts = target.relative_to(cache).parts
    return len(parts) == 3 and parts[1] == "blobs" and parts[0].startswith(
        ("models--", "datasets--", "spaces--"))


def push(folder: str | os.PathLike[str], repo_id: str, *, private: bool = False,
         revision: str | None = None, message: str | None = None, create_pr: bool = False,
         include: list[str] | None = None, exclude: list[str] | None = None,
         repo_type: str = "model", progress: Progress = SILENT) -> PushReport:
    """Create the repo if needed and upload ``folder`` in one commit (or a pull request),
    with a model card made from what the folder holds.

    Example::

        loratool.push("adapter/", "me/my-adapter", private=True).commit_url
    """
    hf = hub()
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; push uploads a model or adapter folder")
    files = _files(folder, list(include or []), list(exclude or []))
    if not files:
        raise InputError(f"{folder}: nothing to upload (check --include/--exclude)")
    card = model_card(folder)
    api = hf.HfApi()
    where = f"{repo_id}@{revision}" if revision else repo_id
    progress.clear()  # the Hub's own bars take the line
    with hub_errors(where, revision, progress.hub_bars):
        if not api.token and not os.environ.get("HF_TOKEN"):
            if not hf.get_token():
                raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
        if private and not api.repo_info(repo_id, repo_type=repo_type).private:
            raise HubError(f"{repo_id}: exists and is public; --private does not change an "
                           "existing repo (make it private on the Hub, or drop --private)")
        if revision and not create_pr:  # a pull request targets an existing revision
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type=repo_type)
        ops = [hf.CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(),
                                  path_or_fileobj=str(p)) for p in files]
        ops.append(hf.CommitOperationAdd(path_in_repo="README.md",
                                      path_or_fileobj=card.encode("utf-8")))
        info = api.create_commit(repo_id, operations=ops, revision=revision,
                                 commit_message=message or f"Upload {folder.name} with loratool",
                                 create_pr=create_pr, repo_type=repo_type)
    return PushReport(repo=repo_id, revision=revision, files=len(ops),
                      commit_url=info.commit_url, pr_url=info.pr_url, commit=info.oid)
