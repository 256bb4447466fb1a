"""Every command as a person runs it: in a terminal (a pseudo-terminal, so stdout and stderr
are ttys and progress bars are drawn), as a separate process, on the demo's models.

Tests that capture output never draw a bar, so they cannot see what only a terminal shows
(a bar without a total once crashed merge, unmerge and extract in every terminal).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from conftest import tree

BAR = re.compile(r"\d+%\|")  # a tqdm bar with a known total, as drawn


def run_in_terminal(*args: object, env: dict[str, str] | None = None, timeout: float = 300,
                    cwd: Path | None = None) -> tuple[int, str]:
    """Run ``loratool ARGS`` with stdin, stdout and stderr on a pseudo-terminal of 100
    columns; its exit code and everything it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "loratool", *map(str, args)],
                            stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                            env={**os.environ, "TERM": "xterm", **(env or {})})
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                proc.kill()
                raise TimeoutError(f"loratool {args[0]} wrote nothing for {timeout} s")
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from loratool.verbs.demo import build_pair

    d = tmp_path_factory.mktemp("terminal")
    build_pair(d)
    return d


def _ok(rc: int, out: str, bar: bool = True) -> None:
    assert rc == 0, out
    assert "internal error" not in out and "Traceback" not in out, out
    if bar:
        assert BAR.search(out), f"no progress bar was drawn:\n{out}"


COMMANDS = {  # name: (arguments, whether a bar must be drawn)
    "inspect": (["inspect", "{d}/base"], False),  # headers only: nothing long to show
    "inspect-against": (["inspect", "{d}/base", "--against", "{d}/tuned"], True),
    "extract": (["extract", "{d}/base", "{d}/tuned", "-o", "{o}/ex", "--rank", "8"], True),
    "extract-budget": (["extract", "{d}/base", "{d}/tuned", "-o", "{o}/exb", "--budget",
                        "2MB"], True),
    "merge": (["merge", "{d}/base", "{d}/adapter", "-o", "{o}/m"], True),
    "merge-verify": (["merge", "{d}/base", "{d}/adapter", "-o", "{o}/mv", "--verify"], True),
    "unmerge": (["unmerge", "{d}/tuned", "{d}/adapter", "-o", "{o}/u"], True),
    "combine": (["combine", "{d}/adapter", "{d}/adapter", "--method", "svd", "--rank", "4",
                 "-o", "{o}/c"], True),
    "resize": (["resize", "{d}/adapter", "--rank", "4", "-o", "{o}/r"], True),
    "convert": (["convert", "{d}/adapter", "--to", "gguf", "--base", "{d}/base", "-o",
                 "{o}/a.gguf"], False),
    "export": (["export", "{d}/base", "{d}/adapter", "-o", "{o}/onnx"], True),
    "analyze": (["analyze", "{d}/base", "{d}/tuned", "--plot", "{o}/p", "--html",
                 "{o}/a.html"], True),
    "analyze-adapter": (["analyze", "{d}/adapter", "--base", "{d}/base"], True),
    "analyze-compare": (["analyze", "--compare", "{d}/adapter", "{d}/adapter"], True),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_in_a_terminal(demo, tmp_path, name):
    args, bar = COMMANDS[name]
    rc, out = run_in_terminal(*[a.format(d=demo, o=tmp_path) for a in args])
    _ok(rc, out, bar)


def test_quiet_draws_nothing(demo, tmp_path):
    rc, out = run_in_terminal("-q", "merge", demo / "base", demo / "adapter", "-o",
                              tmp_path / "m")
    assert rc == 0 and not BAR.search(out), out


def test_demo_in_a_terminal(tmp_path):
    rc, out = run_in_terminal("demo", "--workdir", tmp_path / "demo")
    _ok(rc, out)
    assert "loratool merge" in out and "loratool extract" in out


def test_push_and_pull_in_a_terminal(demo, tmp_path):
    from hub_server import HubServer

    with HubServer() as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"),
               "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_test",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        rc, out = run_in_terminal("push", demo / "adapter", "me/adapter", env=env)
        _ok(rc, out, bar=False)
        rc, out = run_in_terminal("pull", "me/adapter", "-o", tmp_path / "back", env=env)
        _ok(rc, out)
    assert tree(tmp_path / "back")["adapter_model.safetensors"] == tree(demo / "adapter")[
        "adapter_model.safetensors"]
