"""olah (PyPI, MIT), a self-hosted Hub mirror, serving local git repositories offline on
127.0.0.1: the read side of the Hub for the pull tests, with real git commits behind it.

olah pins its own web stack, so it lives in its own virtual environment: ``.ci/run`` makes
``.ci-olah`` (``python3 -m venv .ci-olah && .ci-olah/bin/pip install olah``); a developer can
point ``LORATOOL_OLAH`` at any ``olah-cli``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def olah_cli() -> Path | None:
    """The olah-cli to use, or None when none is installed."""
    for p in (os.environ.get("LORATOOL_OLAH"), ROOT / ".ci-olah" / "bin" / "olah-cli",
              ROOT / ".olah-venv" / "bin" / "olah-cli"):
        if p and Path(p).is_file():
            return Path(p)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Olah:
    """``with Olah(mirror_dir, work_dir) as url:`` — olah in offline mode over the mirror."""

    def __init__(self, mirror: Path, work: Path) -> None:
        self.mirror, self.work = mirror, work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        cli = olah_cli()
        assert cli is not None
        cfg = self.work / "olah.toml"
        cfg.write_text(f"""[basic]
host = "127.0.0.1"
port = {self.port}
mirror-netloc = "127.0.0.1:{self.port}"
mirror-lfs-netloc = "127.0.0.1:{self.port}"
repos-path = "{self.work / 'olah-repos'}"
mirrors-path = ["{self.mirror}"]

[accessibility]
offline = true
""")
        self.proc = subprocess.Popen([str(cli), "-c", str(cfg)], cwd=self.work,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self.url
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("olah exited at start")
                time.sleep(0.2)
        raise RuntimeError("olah did not start within 60 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
