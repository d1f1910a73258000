"""A local stand-in for the Hugging Face Hub, so that Hub tests run offline on 127.0.0.1.

    server = HubServer().start()
    sha = server.add_repo("quantkit-test/tiny", folder)      # every file of the folder, one commit on main
    env = {"HF_ENDPOINT": server.url}                         # huggingface_hub now talks to this server
    server.drop_once.add("model-00002-of-00006.safetensors")  # the next download of it breaks off half way
    ...
    server.stop()

It implements the endpoints huggingface_hub 2.x calls, in the Hub's URL layout:

    GET  /api/models/{repo}[/revision/{rev}]                 model info (commit sha, siblings)
    GET  /api/models/{repo}/tree/{rev}[/{path}]              listing with git blob ids and LFS sha256/size
    HEAD|GET /{repo}/resolve/{rev}/{path}                    ETag, X-Repo-Commit, X-Linked-Etag, X-Linked-Size,
                                                             Range requests (206 + Content-Range)
    POST /api/repos/create, /api/validate-yaml, /api/models/{repo}/branch/{name}
    POST /api/models/{repo}/preupload/{rev}                  upload mode and remote oid per file
    POST /{repo}.git/info/lfs/objects/batch, PUT /lfs-upload/{oid}   basic LFS transfer, sha256 checked
    POST /api/models/{repo}/commit/{rev}                     ndjson commit: file, lfsFile, deletedFile

Errors carry the Hub's X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound), so huggingface_hub
raises its own exception types. Every request is logged (method, path, Range) for the tests to inspect, and the
Authorization headers seen are kept so that a test can check a token was sent without it being printed anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
LFS_MIN = 10 << 20  # larger files go to LFS whatever their suffix, as the Hub does


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}
    branches: dict[str, str] = field(default_factory=dict)
    private: bool = False
    history: list[dict] = field(default_factory=list)  # the commits received: summary, revision, paths


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.auth_seen: set[str] = set()
        self.drop_once: set[str] = set()  # file names whose next full GET breaks off half way
        self.dropped: list[str] = []
        self.corrupt: set[str] = set()  # file names served with their last byte flipped (listing and ETag true)
        self.fail_commits = 0  # the next N commit requests answer 500
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- setup ---------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, folder: Path | None = None, files: dict[str, bytes] | None = None) -> str:
        """Create a repo whose main branch holds the folder's files (and `files`). Returns the commit sha."""
        content = dict(files or {})
        if folder is not None:
            for p in sorted(Path(folder).rglob("*")):
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
                    content[p.relative_to(folder).as_posix()] = p.read_bytes()
        repo = self.repos.setdefault(repo_id, Repo())
        sha = self._new_commit(repo_id, repo, content, "initial commit")
        repo.branches["main"] = sha
        for path, data in content.items():
            if is_lfs(path, len(data)):
                self.lfs_store[hashlib.sha256(data).hexdigest()] = data
        return sha

    def _new_commit(self, repo_id: str, repo: Repo, content: dict[str, bytes], summary: str) -> str:
        h = hashlib.sha1(f"{repo_id}\n{summary}\n{len(repo.commits)}\n".encode())
        for path in sorted(content):
            h.update(f"{path}:{git_blob_sha1(content[path])}\n".encode())
        sha = h.hexdigest()
        repo.commits[sha] = content
        return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches.get(revision, revision)]

    def served_bytes(self, name: str) -> list[str | None]:
        """The Range headers of every GET of a file named `name` (None for a whole-file GET)."""
        return [rng for method, path, rng in self.log if method == "GET" and path.endswith("/" + name)]


class _Handler(BaseHTTPRequestHandler):
    server_state: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the log list is the record
        pass

    # ---- plumbing ------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code} if code else None, head)

    def _record(self) -> None:
        hub = self.server_state
        with hub._lock:
            hub.log.append((self.command, urlsplit(self.path).path, self.headers.get("Range")))
            if self.headers.get("Authorization"):
                hub.auth_seen.add(self.headers["Authorization"])

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.server_state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
        return repo

    def _commit(self, repo: Repo, rev: str, head: bool = False) -> str | None:
        rev = unquote(rev)
        sha = repo.branches.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        return sha

    # ---- methods -------------------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._record()
        self._route("HEAD")

    def do_GET(self) -> None:
        self._record()
        self._route("GET")

    def do_POST(self) -> None:
        self._record()
        self._route("POST")

    def do_PUT(self) -> None:
        self._record()
        self._route("PUT")

    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        head = method == "HEAD"
        try:
            if method in ("GET", "HEAD"):
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                    return self._tree(m[1], m[2], unquote(m[3] or ""), query)
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                    return self._info(m[1], m[2] or "main", head)
                if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                    return self._resolve(m[1], m[2], unquote(m[3]), head)
            elif method == "POST":
                body = self._body()
                if path == "/api/repos/create":
                    return self._create(json.loads(body))
                if path == "/api/validate-yaml":
                    return self._json(200, {"errors": [], "warnings": []})
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
                    return self._preupload(m[1], m[2], json.loads(body))
                if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                    return self._lfs_batch(m[1], json.loads(body))
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
                    return self._commit_post(m[1], m[2], body)
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/([^/]+)", path):
                    return self._branch(m[1], unquote(m[2]))
            elif method == "PUT":
                body = self._body()
                if m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path):
                    return self._lfs_put(m[1], body)
            self._error(404, None, f"no route for {method} {path}", head)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ---- download side -------------------------------------------------------------------------------------

    def _info(self, repo_id: str, rev: str, head: bool) -> None:
        repo = self._repo(repo_id, head)
        sha = repo and self._commit(repo, rev, head)
        if sha:
            files = repo.commits[sha]
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                             "siblings": [{"rfilename": p} for p in sorted(files)]}, head=head)

    def _tree(self, repo_id: str, rev: str, prefix: str, query: dict) -> None:
        repo = self._repo(repo_id)
        sha = repo and self._commit(repo, rev)
        if not sha:
            return
        recursive = query.get("recursive", ["False"])[0].lower() in ("true", "1")
        base = prefix.rstrip("/") + "/" if prefix else ""
        out, folders = [], set()
        for p, data in sorted(repo.commits[sha].items()):
            if not p.startswith(base):
                continue
            rest = p[len(base):]
            if "/" in rest and not recursive:
                folders.add(base + rest.split("/")[0])
                continue
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": p}
            if is_lfs(p, len(data)):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(entry)
        out += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._json(200, out)

    def _resolve(self, repo_id: str, rev: str, name: str, head: bool) -> None:
        hub = self.server_state
        repo = self._repo(repo_id, head)
        sha = repo and self._commit(repo, rev, head)
        if not sha:
            return
        data = repo.commits[sha].get(name)
        if data is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist", head)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if is_lfs(name, len(data)):
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": len(data)})
        if name in hub.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        rng = self.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
            start, end = int(m[1]), int(m[2]) if m[2] else len(data) - 1
            end = min(end, len(data) - 1)
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers, head)
        if not head and name in hub.drop_once and len(data) > 16:
            with hub._lock:
                hub.drop_once.discard(name)
                hub.dropped.append(name)
            # The whole length is announced, half is sent, then the connection goes: a network failure mid-file.
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(200, data, headers, head)

    # ---- upload side ---------------------------------------------------------------------------------------

    def _create(self, payload: dict) -> None:
        hub = self.server_state
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        url = f"http://{self.headers.get('Host')}/{repo_id}"
        if repo_id in hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        hub.add_repo(repo_id, files={".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        hub.repos[repo_id].private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self._json(200, {"url": url, "name": repo_id})

    def _branch(self, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if branch in repo.branches:
            return self._error(409, None, f"Reference already exists: {branch}")
        repo.branches[branch] = repo.branches["main"]
        self._json(200, {})

    def _preupload(self, repo_id: str, rev: str, payload: dict) -> None:
        repo = self._repo(repo_id)
        sha = repo and self._commit(repo, rev)
        if not sha:
            return
        current = repo.commits[sha]
        out = []
        for f in payload["files"]:
            lfs = is_lfs(f["path"], int(f["size"]))
            old = current.get(f["path"])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old))
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self._json(200, {"files": out})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        hub = self.server_state
        if self._repo(repo_id) is None:
            return
        base = f"http://{self.headers.get('Host')}"
        objects = []
        for o in payload["objects"]:
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in hub.lfs_store:
                entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{o['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, None, "sha256 of the uploaded content does not match the oid")
        self.server_state.lfs_store[oid] = body
        self._send(200)

    def _commit_post(self, repo_id: str, rev: str, body: bytes) -> None:
        hub = self.server_state
        repo = self._repo(repo_id)
        sha = repo and self._commit(repo, rev)
        if not sha:
            return
        with hub._lock:
            if hub.fail_commits > 0:
                hub.fail_commits -= 1
                return self._error(500, None, "Internal Error (injected by the test)")
        content = dict(repo.commits[sha])
        summary, paths = "", []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                content[value["path"]] = base64.b64decode(value["content"])
                paths.append(value["path"])
            elif key == "lfsFile":
                data = hub.lfs_store.get(value["oid"])
                if data is None:
                    return self._error(422, None, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                content[value["path"]] = data
                paths.append(value["path"])
            elif key == "deletedFile":
                content.pop(value["path"], None)
        new = hub._new_commit(repo_id, repo, content, summary)
        branch = unquote(rev)
        repo.branches[branch if branch in repo.branches else "main"] = new
        repo.history.append({"summary": summary, "revision": branch, "paths": paths, "commit": new})
        host = f"http://{self.headers.get('Host')}"
        self._json(200, {"commitUrl": f"{host}/{repo_id}/commit/{new}", "commitOid": new, "pullRequestUrl": None})
