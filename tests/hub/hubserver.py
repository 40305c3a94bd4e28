"""A real HTTP server on 127.0.0.1 that speaks enough of the Hugging Face Hub's file API for
``huggingface_hub`` (pointed at it by $HF_ENDPOINT):

    GET  /api/models/{org}/{name}[/revision/{rev}]   model info: sha, siblings with sizes
    GET  /api/models/{org}/{name}/tree/{rev}[/path]  the file listing (paginated by Link header)
    HEAD /{org}/{name}/resolve/{rev}/{file}          ETag, X-Repo-Commit, Content-Length
    GET  /{org}/{name}/resolve/{rev}/{file}          the bytes; Range requests answered with 206

Unknown repos answer 404 with ``X-Error-Code: RepoNotFound``, unknown revisions
``RevisionNotFound``, unknown files ``EntryNotFound``, as the Hub does. ``drop_once`` makes the
first full GET of a file stop halfway through its body (the connection closes), to test resume.
Every request is logged (method, path, Range header) for the tests to assert what was fetched.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["Repo", "HubServer", "Request"]


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes]
    commit: str = ""

    def __post_init__(self):
        if not self.commit:
            h = hashlib.sha1(self.repo_id.encode())
            for path in sorted(self.files):
                h.update(path.encode())
                h.update(hashlib.sha256(self.files[path]).digest())
            self.commit = h.hexdigest()

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path, extra: dict[str, bytes] | None = None) -> Repo:
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        files.update(extra or {})
        return cls(repo_id, files)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


def _lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin", ".gguf"))


def _etag(data: bytes, path: str) -> str:
    return hashlib.sha256(data).hexdigest() if _lfs(path) else hashlib.sha1(data).hexdigest()


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)   # file paths whose first full GET is cut halfway
    page_size: int = 3
    log: list[Request] = field(default_factory=list)

    def add(self, repo: Repo) -> Repo:
        self.repos[repo.repo_id] = repo
        return repo

    def start(self) -> HubServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                server._handle(self, head=True)

            def do_GET(self):
                server._handle(self, head=False)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def fetched(self, path_suffix: str) -> list[Request]:
        """GETs of resolve URLs ending in ``path_suffix``."""
        return [r for r in self.log if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(path_suffix)]

    # -- request handling ------------------------------------------------------------------
    def _send_json(self, h, status: int, value, head: bool, headers: dict | None = None) -> None:
        body = json.dumps(value).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, code: str, head: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": code}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send_json(h, 404, {"error": code}, head, headers)

    def _repo(self, parts: list[str]) -> tuple[Repo | None, list[str]]:
        if len(parts) < 2:
            return None, []
        return self.repos.get(f"{parts[0]}/{parts[1]}"), parts[2:]

    def _rev_ok(self, repo: Repo, rev: str) -> bool:
        return rev in ("main", repo.commit)

    def _handle(self, h, head: bool) -> None:
        url = urlsplit(h.path)
        self.log.append(Request("HEAD" if head else "GET", url.path, h.headers.get("Range")))
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"]:
            repo, rest = self._repo(parts[2:])
            if repo is None:
                return self._error(h, "RepoNotFound", head)
            if not rest or rest[0] == "revision":
                rev = rest[1] if len(rest) > 1 else "main"
                if not self._rev_ok(repo, rev):
                    return self._error(h, "RevisionNotFound", head)
                return self._send_json(h, 200, {
                    "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit, "private": False,
                    "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(repo.files.items())],
                }, head)
            if rest[0] == "tree":
                rev = rest[1] if len(rest) > 1 else "main"
                if not self._rev_ok(repo, rev):
                    return self._error(h, "RevisionNotFound", head)
                entries = [self._entry(p, d) for p, d in sorted(repo.files.items())]
                start = 0
                for kv in (url.query or "").split("&"):
                    if kv.startswith("cursor="):
                        start = int(kv.split("=", 1)[1])
                page = entries[start:start + self.page_size]
                headers = {}
                if start + self.page_size < len(entries):
                    nxt = f"{self.url}{url.path}?recursive=True&cursor={start + self.page_size}"
                    headers["Link"] = f'<{nxt}>; rel="next"'
                return self._send_json(h, 200, page, head, headers)
            return self._error(h, "NotFound", head)
        repo, rest = self._repo(parts)
        if repo is None or len(rest) < 3 or rest[0] != "resolve":
            return self._error(h, "RepoNotFound", head)
        rev, path = rest[1], "/".join(rest[2:])
        if not self._rev_ok(repo, rev):
            return self._error(h, "RevisionNotFound", head)
        data = repo.files.get(path)
        if data is None:
            return self._error(h, "EntryNotFound", head, repo.commit)
        etag = f'"{_etag(data, path)}"'
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a) if a else 0
            end = int(b) + 1 if b else len(data)
            end = min(end, len(data))
            status = 206
        else:
            end = len(data)
        body = data[start:end]
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", etag)
        h.send_header("X-Repo-Commit", repo.commit)
        h.send_header("Accept-Ranges", "bytes")
        if _lfs(path):
            h.send_header("X-Linked-Etag", etag)
            h.send_header("X-Linked-Size", str(len(data)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        cut = not head and status == 200 and path in self.drop_once
        if cut:
            self.drop_once.discard(path)
            h.send_header("Connection", "close")
        h.end_headers()
        if head:
            return
        if cut:  # half the body, then the connection goes away
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            try:
                h.connection.shutdown(2)
            except OSError:
                pass
            return
        h.wfile.write(body)

    def _entry(self, path: str, data: bytes) -> dict:
        e = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if _lfs(path):
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return e
