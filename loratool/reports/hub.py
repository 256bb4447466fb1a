"""What ``pull`` and ``push`` report: where the files are, or the commit that holds them.

Example::

    r = loratool.pull("org/adapter", "adapter/")
    r.path, r.files
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Report


@dataclass
class PullReport(Report):
    """A download: the repo, the revision asked for, the local folder and its files."""

    repo: str
    revision: str | None
    path: str
    files: list[str]

    def render(self) -> str:
        return self.path  # what a shell script wants: cd "$(loratool pull org/name)"


@dataclass
class PushReport(Report):
    """An upload: one commit (or pull request) with every file and the model card."""

    repo: str
    revision: str | None
    files: int
    commit_url: str
    pr_url: str | None
    commit: str

    def render(self) -> str:
        return self.pr_url or self.commit_url
