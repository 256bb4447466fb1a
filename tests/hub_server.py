"""A small read-only Hub server on 127.0.0.1 for tests: the real ``huggingface_hub`` client
talks HTTP to it, and it records every request so that tests can check what was downloaded.

It serves the endpoints the client uses to read a model repo:
  GET  /api/models/{repo}/revision/{rev}        repo info (sha, siblings)
  GET  /api/models/{repo}/tree/{rev}[/{path}]   file listing
  HEAD /{repo}/resolve/{rev}/{file}             metadata (commit, etag, size)
  GET  /{repo}/resolve/{rev}/{file}             content, with Range support (206)
and the ones it uses to write:
  POST /api/repos/create, /api/models/{repo}/branch/{name}, /api/models/{repo}/preupload/{rev},
       /api/models/{repo}/commit/{rev} (NDJSON), /api/validate-yaml
  POST /{repo}.git/info/lfs/objects/batch, PUT /lfs-upload/{oid}: the basic LFS transfer, for
       *.safetensors and files over 1 MB (others are sent inline, as the Hub decides); the Xet
       path is not served (tests set HF_HUB_DISABLE_XET=1)
Errors carry the ``X-Error-Code`` header the client maps to its exceptions. Writes need an
Authorization header; private repos are invisible without one. Nothing else is checked: a
stand-in for the Hub's HTTP interface, not a copy of it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    private: bool = False
    messages: dict[str, str] = field(default_factory=dict)  # sha -> commit message


class HubServer:
    """Start with ``with HubServer() as hub:``; add repos with :meth:`add`. With ``git_root``,
    every commit is also made as a real git commit in ``git_root/models/<org>/<name>``, the
    layout olah serves as a local mirror."""

    def __init__(self, git_root: Path | None = None) -> None:
        self.git_root = git_root
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> uploaded LFS object
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, range)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                server._handle(self, head=True)

            def do_GET(self) -> None:
                server._handle(self, head=False)

            def do_POST(self) -> None:
                server._post(self)

            def do_PUT(self) -> None:
                server._put(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, repo: str, folder: Path, ref: str = "main") -> str:
        """Publish every file of ``folder`` as a commit of ``repo`` on ``ref``; its sha."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        digest = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest())
                                                for k, v in files.items())).encode())
        sha = digest.hexdigest()
        r = self.repos.setdefault(repo, Repo())
        r.commits[sha] = files
        r.refs[ref] = sha
        return sha

    def downloads(self, suffix: str = "") -> list[str]:
        """Files fetched whole (GET without Range) whose name ends with ``suffix``."""
        return [p for m, p, rng in self.log if m == "GET" and rng is None and "/resolve/" in p
                and p.endswith(suffix)]

    # ------------------------------------------------------------------ request handling

    def _resolve(self, repo: str, rev: str, auth: bool = True
                 ) -> tuple[str, dict[str, bytes]] | str:
        if repo not in self.repos or (self.repos[repo].private and not auth):
            return "RepoNotFound"
        r = self.repos[repo]
        sha = r.refs.get(rev, rev if rev in r.commits else None)
        if sha is None:
            return "RevisionNotFound"
        return sha, r.commits[sha]

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.log.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        self._read(h, path, head, bool(h.headers.get("Authorization")))

    def _read(self, h: BaseHTTPRequestHandler, path: str, head: bool, auth: bool) -> None:
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m:
            got = self._resolve(m.group(1), m.group(2) or "main", auth)
            if isinstance(got, str):
                return self._error(h, got)
            sha, files = got
            return self._json(h, {"id": m.group(1), "modelId": m.group(1), "sha": sha,
                                  "private": self.repos[m.group(1)].private,
                                  "siblings": [{"rfilename": f}
                                                                 for f in files]})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if m:
            got = self._resolve(m.group(1), m.group(2), auth)
            if isinstance(got, str):
                return self._error(h, got)
            prefix = (m.group(3) or "").strip("/")
            entries = [{"type": "file", "path": f, "size": len(b),
                        "oid": hashlib.sha1(b).hexdigest()}
                       for f, b in got[1].items() if not prefix or f.startswith(prefix + "/")]
            return self._json(h, entries)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            got = self._resolve(m.group(1), m.group(2), auth)
            if isinstance(got, str):
                return self._error(h, got)
            sha, files = got
            if m.group(3) not in files:
                return self._error(h, "EntryNotFound")
            return self._file(h, files[m.group(3)], sha, head)
        return self._error(h, "RepoNotFound")

    def _json(self, h: BaseHTTPRequestHandler, obj: object) -> None:
        body = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, code: str, status: int = 404) -> None:
        body = json.dumps({"error": code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _file(self, h: BaseHTTPRequestHandler, data: bytes, sha: str, head: bool) -> None:
        rng = h.headers.get("Range")
        status, start, end = 200, 0, len(data) - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and not head:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            status = 206
        body = data[start:end + 1]
        h.send_response(status)
        h.send_header("X-Repo-Commit", sha)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(body) if not head else len(data)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if not head:
            h.wfile.write(body)

    # ------------------------------------------------------------------ writes

    def _commit(self, repo: str, ref: str, files: dict[str, bytes], message: str) -> str:
        r = self.repos[repo]
        digest = hashlib.sha1(json.dumps([ref, message, len(r.commits), sorted(
            (k, hashlib.sha1(v).hexdigest()) for k, v in files.items())]).encode())
        sha = digest.hexdigest()
        r.commits[sha] = files
        r.messages[sha] = message
        r.refs[ref] = sha
        if self.git_root is not None and not ref.startswith("refs/"):
            self._git_commit(repo, ref, files, message)
        return sha

    def _git(self, d: Path, *args: str) -> None:
        subprocess.run(["git", "-c", "user.name=hub", "-c", "user.email=hub@localhost", *args],
                       cwd=d, check=True, capture_output=True)

    def _git_commit(self, repo: str, ref: str, files: dict[str, bytes], message: str) -> None:
        assert self.git_root is not None
        d = self.git_root / "models" / repo
        if not (d / ".git").exists():
            d.mkdir(parents=True)
            self._git(d, "init", "-q", "-b", "main")
        else:
            self._git(d, "checkout", "-q", ref if ref in self._branches(d) else "-b", *(
                [] if ref in self._branches(d) else [ref]))
        for p in d.iterdir():
            if p.name != ".git":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for name, data in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)
        self._git(d, "add", "-A")
        self._git(d, "commit", "-q", "--allow-empty", "-m", message or "commit")

    def _branches(self, d: Path) -> list[str]:
        out = subprocess.run(["git", "branch", "--format=%(refname:short)"], cwd=d,
                             capture_output=True, text=True, check=True).stdout
        return out.split()

    @staticmethod
    def _body(h: BaseHTTPRequestHandler) -> bytes:
        """The request body, with Content-Length or chunked (how the client streams files)."""
        if h.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return h.rfile.read(int(h.headers.get("Content-Length") or 0))
        out = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                h.rfile.readline()
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()

    def _put(self, h: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(h.path).path)
        body = self._body(h)
        self.log.append(("PUT", path, None))
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if not m or hashlib.sha256(body).hexdigest() != m.group(1):
            return self._error(h, "LfsChecksum", 400)
        self.lfs[m.group(1)] = body
        h.send_response(200)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        body = self._body(h)
        self.log.append(("POST", path, None))
        if not h.headers.get("Authorization"):
            return self._error(h, "RepoNotFound", 401)
        if getattr(self, "forbid", False) and path != "/api/validate-yaml":
            return self._error(h, "Forbidden", 403)
        if path == "/api/validate-yaml":
            return self._json(h, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m:
            req = json.loads(body)
            # an object the server already has gets no actions: the client skips its upload
            return self._json(h, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "authenticated": True,
                 **({} if o["oid"] in self.lfs else {"actions": {
                     "upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}})}
                for o in req["objects"]]})
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req.get('organization') or 'user'}/{req['name']}"
            if repo in self.repos:  # the client reads the url from the conflict, as the Hub's
                body = json.dumps({"error": "You already created this model repo",
                                   "url": f"{self.url}/{repo}"}).encode()
                h.send_response(409)
                h.send_header("Content-Type", "application/json")
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)
                return None
            self.repos[repo] = Repo(private=bool(req.get("private"))
                                    or req.get("visibility") == "private")
            self._commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs\n"},
                         "initial commit")
            return self._json(h, {"url": f"{self.url}/{repo}", "name": repo})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
        if not m or m.group(1) not in self.repos:
            return self._error(h, "RepoNotFound")
        repo, verb, rev = m.group(1), m.group(2), m.group(3)
        r = self.repos[repo]
        if verb == "branch":
            if rev in r.refs:
                return self._error(h, "BranchExists", 409)
            r.refs[rev] = r.refs["main"]
            if self.git_root is not None:
                self._git(self.git_root / "models" / repo, "branch", rev, "main")
            return self._json(h, {})
        if rev not in r.refs and rev not in r.commits:
            return self._error(h, "RevisionNotFound")
        if verb == "preupload":
            files = json.loads(body)["files"]
            return self._json(h, {"files": [
                {"path": f["path"], "shouldIgnore": False,
                 "uploadMode": "lfs" if f["path"].endswith(".safetensors") or f["size"] > 2**20
                 else "regular"} for f in files]})
        lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        parent = r.refs.get(rev, rev)
        files = dict(r.commits[parent])
        for x in lines:
            if x["key"] == "file":
                files[x["value"]["path"]] = base64.b64decode(x["value"]["content"])
            elif x["key"] in ("deletedFile", "deletedFolder"):
                files.pop(x["value"]["path"], None)
            elif x["key"] == "lfsFile":
                oid = x["value"]["oid"]
                if oid not in self.lfs:
                    return self._error(h, "LfsObjectMissing", 400)
                files[x["value"]["path"]] = self.lfs[oid]
        pr = None
        ref = rev
        if "create_pr" in url.query:
            n = sum(1 for k in r.refs if k.startswith("refs/pr/")) + 1
            ref, pr = f"refs/pr/{n}", f"{self.url}/{repo}/discussions/{n}"
        sha = self._commit(repo, ref, files, header.get("summary", ""))
        return self._json(h, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha,
                              "pullRequestUrl": pr})
