"""A loopback stand-in for Hugging Face and ModelScope, close enough to their HTTP APIs that the
real client libraries (huggingface_hub, modelscope_hub) do the downloading in the tests.

One server speaks both, so HF_ENDPOINT and MODELSCOPE_ENDPOINT can point at the same URL:

- Hugging Face: GET /api/models/{repo}[/revision/{rev}] (model info with `siblings`, sizes and LFS
  sha256 when asked for `blobs`), GET /api/models/{repo}/tree/{rev} (recursive listing), and
  HEAD/GET /{repo}/resolve/{rev}/{path} with the headers huggingface_hub checks (X-Repo-Commit,
  ETag, X-Linked-Etag and X-Linked-Size for LFS files, Content-Length) and Range support. Errors
  carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) as the Hub's do.
- ModelScope: GET /api/v1/models/{repo}/repo/files (the listing, with Size and Sha256),
  GET /api/v1/models/{repo}/repo?Revision=..&FilePath=.. (the file, with Range support),
  GET /api/v1/models/{repo} (repo info), and a 404 for the intra-cloud acceleration probe.
  Errors are the legacy JSON envelope {"Code", "Message", "RequestId", "Success": false}.

Faults for the tests: `drop_once` closes the connection mid-file once, `stall` sends part of a
file and then waits until released, `hold` waits before sending a file at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".jpg")


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False  # HF: info is public, files need a token; ModelScope: everything needs one
    reported_sizes: dict[str, int] = field(default_factory=dict)  # sizes the listings claim instead

    def size(self, path: str) -> int:
        return self.reported_sizes.get(path, len(self.files[path]))

    @staticmethod
    def from_folder(folder: Path, extra: dict[str, bytes] | None = None) -> FakeRepo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return FakeRepo(files | (extra or {}))


@dataclass(frozen=True)
class Request:
    method: str
    api: str  # "hf" or "ms"
    repo: str
    path: str | None  # the file, for file requests
    range: str | None

    @property
    def range_start(self) -> int:
        match = re.fullmatch(r"bytes=(\d+)-\d*", self.range or "")
        return int(match.group(1)) if match else 0


class FakeHub:
    """The server and its state: repos, a request log, and armed faults."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Request] = []
        self.drop_once: dict[str, int] = {}  # file path -> offset at which the connection closes, once
        self.stall: dict[str, int] = {}  # file path -> offset at which sending pauses until `release`
        self.hold: dict[str, threading.Event] = {}  # file path -> sent only once the event is set
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler_class())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        for event in self.hold.values():
            event.set()
        self.server.shutdown()
        self.server.server_close()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
        self.drop_once.clear()
        self.stall.clear()
        for event in self.hold.values():
            event.set()
        self.hold.clear()
        self.stalled.clear()
        self.release.clear()

    def body_requests(self) -> list[Request]:
        """Requests that transferred (or began to transfer) a file's bytes."""
        with self.lock:
            return [r for r in self.requests if r.path is not None and r.method == "GET"]

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.route(head=True)

            def do_GET(self) -> None:
                self.route(head=False)

            # -- plumbing --------------------------------------------------------------
            def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head=False) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def send_json(self, status: int, data: object, headers: dict[str, str] | None = None, head=False) -> None:
                headers = {"Content-Type": "application/json", **(headers or {})}
                self.send(status, json.dumps(data).encode(), headers, head)

            def log(self, api: str, repo: str, path: str | None, head: bool) -> None:
                with hub.lock:
                    hub.requests.append(Request("HEAD" if head else "GET", api, repo, path, self.headers.get("Range")))

            def send_file(self, data: bytes, path: str, headers: dict[str, str], head: bool) -> None:
                """A file with Range support, and the armed faults."""
                start, end = 0, len(data)
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                status = 200
                if match:
                    start = int(match.group(1))
                    end = int(match.group(2)) + 1 if match.group(2) else len(data)
                    if start >= len(data):
                        self.send(416, headers={"Content-Range": f"bytes */{len(data)}"}, head=head)
                        return
                    status = 206
                    headers = headers | {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
                self.send_response(status)
                for name, value in (headers | {"Accept-Ranges": "bytes", "Content-Length": str(end - start)}).items():
                    self.send_header(name, value)
                self.end_headers()
                if head:
                    return
                if path in hub.hold:
                    hub.hold[path].wait(60)
                cut = hub.drop_once.pop(path, None)
                if cut is None and path in hub.stall:
                    cut = hub.stall[path]
                if cut is not None and start < cut < end:
                    self.wfile.write(data[start:cut])
                    self.wfile.flush()
                    if path in hub.stall:
                        hub.stalled.set()
                        hub.release.wait(60)
                    # A dropped connection: the body ends short of its Content-Length.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:end])

            def route(self, head: bool) -> None:
                url = urlsplit(self.path)
                path = unquote(url.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if path.startswith("/api/v1/"):
                    self.modelscope(path.removeprefix("/api/v1/"), query, head)
                elif path.startswith("/api/models/"):
                    self.hf_api(path.removeprefix("/api/models/"), query, head)
                elif "/resolve/" in path:
                    self.hf_resolve(path.lstrip("/"), head)
                else:
                    self.send(404, b"not found", head=head)

            # -- Hugging Face -------------------------------------------------------------
            def hf_error(self, status: int, code: str, message: str, head: bool) -> None:
                headers = {"X-Error-Code": code, "X-Error-Message": message}
                self.send_json(status, {"error": message}, headers, head)

            def hf_api(self, rest: str, query: dict[str, str], head: bool) -> None:
                match = re.fullmatch(r"([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?", rest)
                if not match or match.group(1) not in hub.repos:
                    self.hf_error(404, "RepoNotFound", "Repository not found", head)
                    return
                repo_id, kind, revision = match.group(1), match.group(2), match.group(3)
                repo = hub.repos[repo_id]
                self.log("hf", repo_id, None, head)
                if revision not in (None, "main", repo.sha):
                    self.hf_error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
                    return
                if kind == "tree":
                    self.send_json(200, self.hf_tree(repo), head=head)
                    return
                siblings = []
                for name in repo.files:
                    sibling: dict = {"rfilename": name}
                    if query.get("blobs") in ("True", "true", "1"):
                        sibling |= {"size": repo.size(name), "blobId": self.blob_id(repo.files[name])}
                        if name.endswith(LFS_SUFFIXES):
                            sha = hashlib.sha256(repo.files[name]).hexdigest()
                            sibling["lfs"] = {"sha256": sha, "size": repo.size(name), "pointerSize": 134}
                    siblings.append(sibling)
                info = {
                    "_id": "fake",
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": repo.sha,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "disabled": False,
                    "library_name": "diffusers",
                    "tags": ["diffusers"],
                    "siblings": siblings,
                }
                self.send_json(200, info, head=head)

            @staticmethod
            def blob_id(data: bytes) -> str:
                return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

            def hf_tree(self, repo: FakeRepo) -> list[dict]:
                entries, folders = [], set()
                for name, data in repo.files.items():
                    parts = name.split("/")
                    folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
                    entry = {"type": "file", "oid": self.blob_id(data), "size": repo.size(name), "path": name}
                    if name.endswith(LFS_SUFFIXES):
                        sha = hashlib.sha256(data).hexdigest()
                        entry["lfs"] = {"oid": sha, "size": repo.size(name), "pointerSize": 134}
                    entries.append(entry)
                dirs = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
                return dirs + entries

            def hf_resolve(self, rest: str, head: bool) -> None:
                match = re.fullmatch(r"([^/]+/[^/]+)/resolve/([^/]+)/(.+)", rest)
                if not match or match.group(1) not in hub.repos:
                    self.hf_error(404, "RepoNotFound", "Repository not found", head)
                    return
                repo_id, revision, name = match.groups()
                repo = hub.repos[repo_id]
                self.log("hf", repo_id, name, head)
                if repo.gated and not self.headers.get("Authorization"):
                    message = f"Access to model {repo_id} is restricted. You must be authenticated."
                    self.hf_error(401, "GatedRepo", message, head)
                    return
                if revision not in ("main", repo.sha):
                    self.hf_error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
                    return
                if name not in repo.files:
                    self.hf_error(404, "EntryNotFound", f"{name} does not exist", head)
                    return
                data = repo.files[name]
                headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{self.blob_id(data)}"'}
                if name.endswith(LFS_SUFFIXES):
                    sha = hashlib.sha256(data).hexdigest()
                    headers |= {"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
                self.send_file(data, name, headers, head)

            # -- ModelScope ---------------------------------------------------------------
            def ms_error(self, status: int, message: str, head: bool) -> None:
                body = {"Code": 10010205001 if status == 404 else 10010205002, "Message": message}
                self.send_json(status, body | {"RequestId": "fake", "Success": False}, head=head)

            def modelscope(self, rest: str, query: dict[str, str], head: bool) -> None:
                if rest == "repos/internalAccelerationInfo":
                    self.send(404, b"", head=head)
                    return
                match = re.fullmatch(r"models/([^/]+/[^/]+)(/repo/files|/repo)?", rest)
                if not match or match.group(1) not in hub.repos:
                    self.ms_error(404, "model not found", head)
                    return
                repo_id, kind = match.groups()
                repo = hub.repos[repo_id]
                name = query.get("FilePath") if kind == "/repo" else None
                self.log("ms", repo_id, name, head)
                if repo.gated and not self.headers.get("Authorization"):
                    self.ms_error(401, "Unauthorized: please log in", head)
                    return
                if query.get("Revision", "master") != "master":
                    self.ms_error(404, f"revision {query.get('Revision')} not found", head)
                    return
                if kind is None:
                    info = {"Code": 200, "Data": {"Path": repo_id, "Name": repo_id}, "Success": True}
                    self.send_json(200, info, head=head)
                elif kind == "/repo/files":
                    root = (query.get("Root") or "").strip("/")
                    files = [
                        {
                            "Name": path.rsplit("/", 1)[-1],
                            "Path": path,
                            "Revision": "master",
                            "Size": repo.size(path),
                            "Sha256": hashlib.sha256(data).hexdigest(),
                            "Type": "blob",
                            "IsLFS": path.endswith(LFS_SUFFIXES),
                        }
                        for path, data in repo.files.items()
                        if not root or path.startswith(root + "/")
                    ]
                    envelope = {"Code": 200, "Message": "success", "RequestId": "fake", "Success": True}
                    self.send_json(200, envelope | {"Data": {"Files": files}}, head=head)
                elif name not in repo.files:
                    self.ms_error(404, f"file {name} not found", head)
                else:
                    self.send_file(repo.files[name], name, {"Content-Type": "application/octet-stream"}, head)

        return Handler
