"""A Hub-compatible HTTP server on loopback, for tests that drive the real huggingface_hub client.

Two ``ThreadingHTTPServer`` instances share one in-memory store: the API server (``hub.endpoint``:
repos, commits, refs, preupload, LFS batch, resolve) and a storage server on another port that
stands in for S3/CloudFront (LFS uploads and downloads by signed URL, never with Authorization).
The Hub's cheap rules are kept so the fake still catches real bugs: a bearer token for writes,
strict revisions, the 10 MiB / binary limit on regular files, LFS by ``.gitattributes``, git blob
sha1 / sha256 etags, ``X-Error-Code`` on 404s. Xet is not implemented: clients must run with
``HF_HUB_DISABLE_XET=1`` (see :func:`client_env`). Facts come from huggingface_hub 2.4.0.

API server (``{t}`` is ``models``/``datasets``/``spaces``; ``{prefix}`` is empty for models):
  GET  /api/whoami-v2                        POST /api/validate-yaml
  POST /api/repos/create                     DELETE /api/repos/delete
  GET  /api/{t}/{repo}[/revision/{rev}]      GET  /api/{t}/{repo}/tree/{rev}[/{path}]
  GET  /api/{t}/{repo}/refs                  POST /api/{t}/{repo}/paths-info/{rev}
  POST /api/{t}/{repo}/preupload/{rev}       POST /api/{t}/{repo}/commit/{rev}[?create_pr=1]
  POST|DELETE /api/{t}/{repo}/branch/{name}  GET  /api/{t}/{repo}/xet-*-token/... -> 501
  POST /{prefix}{repo}.git/info/lfs/objects/batch and .../verify
  HEAD|GET /{prefix}{repo}/resolve/{rev}/{path} (LFS: 302 to storage; regular: Range support)
Storage server: PUT /upload/{sha256}?size&sig, HEAD|GET /download/{sha256}?size&sig[&name].
Anything else answers 501, so a client call the fake does not know fails loudly.
"""

from __future__ import annotations

import base64
import codecs
import fnmatch
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

REGULAR_FILE_MAX = 10 * 1024 * 1024
LFS_SPEC = "https://git-lfs.github.com/spec/v1"
LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gguf *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model "
    "*.msgpack *.npy *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar "
    "*.safetensors saved_model/**/* *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
).split()
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_SHA1_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_XET_MESSAGE = (
    "Xet storage is not implemented by this test Hub: run the client with HF_HUB_DISABLE_XET=1"
)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file committed in place of an LFS object."""
    return f"version {LFS_SPEC}\noid sha256:{sha256}\nsize {size}\n".encode()


def is_binary(sample: bytes) -> bool:
    """Hub-like binary sniffing of a file's first bytes: a NUL byte, or not UTF-8."""
    if b"\0" in sample:
        return True
    try:  # incremental decoder: a multi-byte character cut at the end of the sample is fine
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return True
    return False


def _patterns(text: str, lfs_only: bool) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, *attrs = line.split()
        if not lfs_only or "filter=lfs" in attrs:
            out.append(pattern.lstrip("/"))
    return out


def _matches(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path if "/" in p else name, p) for p in patterns)


class HubError(Exception):
    """An error answer: JSON ``{"error": message}``, ``X-Error-Message`` and ``X-Error-Code``."""

    def __init__(
        self, status: int, message: str, code: str | None = None, **headers: str
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


@dataclass(frozen=True)
class FileEntry:
    size: int
    oid: str  # git blob sha1 (of the pointer file for LFS files)
    lfs_sha256: str | None = None

    def tree_json(self, path: str) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        if self.lfs_sha256:
            pointer_size = len(lfs_pointer(self.lfs_sha256, self.size))
            out["lfs"] = {"oid": self.lfs_sha256, "size": self.size, "pointerSize": pointer_size}
        return out


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    message: str
    description: str
    files: dict[str, FileEntry]
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    owner: str
    private: bool
    created: str
    refs: dict[str, str] = field(default_factory=dict)  # full ref name -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: int = 0


@dataclass(frozen=True)
class RequestRecord:
    server: str  # "api" or "storage"
    method: str
    path: str
    status: int
    authorized: bool  # the request carried an Authorization header


@dataclass
class _Fault:
    remaining: int
    status: int
    path_contains: str


@dataclass
class _Request:
    method: str
    raw_path: str
    segs: list[str]
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    user: str | None = None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[0].lower() in ("1", "true")


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(obj: Any, status: int = 200, content_type: str = "application/json") -> _Response:
    return _Response(status, json.dumps(obj).encode(), {"Content-Type": content_type})


def _ranged(data: bytes, range_header: str | None, headers: dict[str, str]) -> _Response:
    headers = {**headers, "Accept-Ranges": "bytes"}
    if not range_header:
        return _Response(200, data, headers)
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
    size = len(data)
    if match is None or match.groups() == ("", ""):
        return _Response(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
    first, last = match.groups()
    start = int(first) if first else max(size - int(last), 0)
    end = min(int(last), size - 1) if first and last else size - 1
    if start >= size or start > end:
        return _Response(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return _Response(206, data[start : end + 1], headers)


class HubServer:
    """In-memory Hub on 127.0.0.1: ``with HubServer(tokens={"hf_x": "alice"}) as hub: ...``."""

    def __init__(self, tokens: Mapping[str, str] | None = None, host: str = "127.0.0.1") -> None:
        self.tokens = dict(tokens or {})  # bearer token -> username
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}  # git blob sha1 -> content (regular files)
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content (uploaded to storage)
        self.requests: list[RequestRecord] = []
        self.errors: list[str] = []  # tracebacks of requests the server failed to handle
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self._counter = itertools.count()
        self._api = ThreadingHTTPServer((host, 0), _handler(self, "api"))
        self._storage = ThreadingHTTPServer((host, 0), _handler(self, "storage"))
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return "http://{}:{}".format(*self._api.server_address[:2])

    @property
    def storage_endpoint(self) -> str:
        return "http://{}:{}".format(*self._storage.server_address[:2])

    def start(self) -> HubServer:
        if not self._threads:
            for server in (self._api, self._storage):
                thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in (self._api, self._storage):
            if self._threads:  # shutdown() waits forever on a server that never served
                server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def fail_next(self, n: int, status: int = 500, path_contains: str = "") -> None:
        """Answer the next ``n`` requests whose path contains ``path_contains`` with ``status``."""
        if not 0 < n <= 20:
            raise ValueError("fail_next: n must be in 1..20 (the client retries 5xx with backoff)")
        with self._lock:
            self._faults.append(_Fault(n, status, path_contains))

    # -- inspection helpers for tests -------------------------------------------------------------
    def head(self, repo_id: str, ref: str = "main", repo_type: str = "model") -> str | None:
        """Commit sha of a branch (``main``) or full ref (``refs/pr/1``), None if absent."""
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return None
        return repo.refs.get(ref if ref.startswith("refs/") else f"refs/heads/{ref}")

    def history(self, repo_id: str, ref: str = "main", repo_type: str = "model") -> list[Commit]:
        """Commits reachable from ``ref``, newest first."""
        repo, sha, out = self.repos[(repo_type, repo_id)], self.head(repo_id, ref, repo_type), []
        while sha is not None:
            out.append(repo.commits[sha])
            sha = repo.commits[sha].parent
        return out

    def read_file(
        self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model"
    ) -> bytes:
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            entry = self._resolve(repo, revision).files[path]
            return self._content(entry)

    def file_entry(
        self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model"
    ) -> FileEntry | None:
        with self._lock:
            commit = self._resolve(self.repos[(repo_type, repo_id)], revision)
            return commit.files.get(path)

    # -- request plumbing ------------------------------------------------------------------------
    def _dispatch(self, server: str, req: _Request) -> _Response:
        with self._lock:
            try:
                for fault in self._faults:
                    if fault.remaining > 0 and fault.path_contains in req.raw_path:
                        fault.remaining -= 1
                        raise HubError(fault.status, "Injected fault (HubServer.fail_next)")
                if server == "storage":
                    return self._storage_route(req)
                req.user = self._authenticate(req)
                return self._api_route(req)
            except HubError as err:
                safe = err.message.encode("ascii", "replace").decode().replace("\n", " ")
                resp = _json({"error": err.message}, err.status)
                resp.headers.update({"X-Error-Message": safe, **err.headers})
                if err.code:
                    resp.headers["X-Error-Code"] = err.code
                return resp
            except Exception as err:  # a malformed request or a server bug: fail loudly, no retry
                self.errors.append(traceback.format_exc())
                message = f"HubServer could not handle the request ({type(err).__name__}: {err})"
                return _json({"error": message}, 400)
            finally:
                self._faults = [f for f in self._faults if f.remaining > 0]

    def _authenticate(self, req: _Request) -> str | None:
        auth = req.headers.get("Authorization")
        if not auth:
            return None
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _api_route(self, req: _Request) -> _Response:
        m, p = req.method, req.segs
        if p == ["api", "whoami-v2"] and m == "GET":
            if req.user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            auth = {"accessToken": {"displayName": "test", "role": "write"}}
            return _json({"name": req.user, "type": "user", "orgs": [], "auth": auth})
        if p == ["api", "validate-yaml"] and m == "POST":
            return self._validate_yaml(req)
        if p == ["api", "repos", "create"] and m == "POST":
            return self._create_repo(req)
        if p == ["api", "repos", "delete"] and m == "DELETE":
            return self._delete_repo(req)
        if len(p) >= 4 and p[0] == "api" and p[1] in REPO_TYPES.values():
            repo_type = p[1][:-1]
            repo_id, action, rest = f"{p[2]}/{p[3]}", (p[4] if len(p) > 4 else ""), p[5:]
            if action.startswith("xet-"):
                raise HubError(501, _XET_MESSAGE)
            if m == "GET" and (action == "" or (action == "revision" and len(rest) == 1)):
                return self._repo_info(req, repo_type, repo_id, rest[0] if rest else "main")
            if m == "GET" and action == "tree" and rest:
                return self._tree(req, repo_type, repo_id, rest[0], "/".join(rest[1:]))
            if m == "GET" and action == "refs" and not rest:
                return self._refs(req, repo_type, repo_id)
            if m == "POST" and action == "paths-info" and len(rest) == 1:
                return self._paths_info(req, repo_type, repo_id, rest[0])
            if m == "POST" and action == "preupload" and len(rest) == 1:
                return self._preupload(req, repo_type, repo_id, rest[0])
            if m == "POST" and action == "commit" and len(rest) == 1:
                return self._commit(req, repo_type, repo_id, rest[0])
            if m in ("POST", "DELETE") and action == "branch" and rest:
                return self._branch(req, repo_type, repo_id, "/".join(rest))
        repo_type, q = "model", p
        if q and q[0] in ("datasets", "spaces"):
            repo_type, q = q[0][:-1], q[1:]
        if len(q) >= 5 and q[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve_file(req, repo_type, f"{q[0]}/{q[1]}", q[3], "/".join(q[4:]))
        if len(q) == 6 and q[1].endswith(".git") and q[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{q[0]}/{q[1][:-4]}"
            if q[5] == "batch" and m == "POST":
                return self._lfs_batch(req, repo_type, repo_id)
            if q[5] == "verify" and m == "POST":
                return self._lfs_verify(req, repo_type, repo_id)
        raise HubError(501, f"HubServer does not implement {m} {urlsplit(req.raw_path).path}")

    # -- repos, access, revisions ----------------------------------------------------------------
    def _repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _readable(self, req: _Request, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and req.user != repo.owner):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _writable(self, req: _Request, repo_type: str, repo_id: str) -> Repo:
        if req.user is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer) to write")
        repo = self._readable(req, repo_type, repo_id)
        if repo.owner != req.user:
            raise HubError(403, f"You don't have write access to {repo_id}")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> Commit:
        for ref in (f"refs/heads/{rev}", rev):
            if ref.startswith("refs/") and ref in repo.refs:
                return repo.commits[repo.refs[ref]]
        if _SHA1_RE.fullmatch(rev) and rev in repo.commits:
            return repo.commits[rev]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, FileEntry], message: str, desc: str
    ) -> Commit:
        seed = json.dumps([parent, message, desc, sorted((k, v.oid) for k, v in files.items())])
        sha = hashlib.sha1(f"{seed}{next(self._counter)}{time.time_ns()}".encode()).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        repo.commits[sha] = Commit(sha, parent, message, desc, dict(files), date)
        return repo.commits[sha]

    def _store_regular(self, data: bytes) -> FileEntry:
        oid = git_blob_sha1(data)
        self.blobs[oid] = data
        return FileEntry(len(data), oid)

    def _content(self, entry: FileEntry) -> bytes:
        return self.lfs_objects[entry.lfs_sha256] if entry.lfs_sha256 else self.blobs[entry.oid]

    def _create_repo(self, req: _Request) -> _Response:
        body = req.json()
        if req.user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        name, namespace = str(body.get("name", "")), body.get("organization") or req.user
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not _NAME_RE.fullmatch(name) or "--" in name or ".." in name or name.endswith(".git"):
            raise HubError(400, f"Invalid repo name: {name!r}")
        if namespace != req.user:
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        repo_id = f"{namespace}/{name}"
        existing = self.repos.get((repo_type, repo_id))
        if existing is not None:
            error = "You already created this repo"
            return _json({"error": error, "url": self._repo_url(existing)}, 409)
        private = bool(body.get("private")) or body.get("visibility") == "private"
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        repo = Repo(repo_type, repo_id, req.user, private, now)
        files = {".gitattributes": self._store_regular(DEFAULT_GITATTRIBUTES.encode())}
        repo.refs["refs/heads/main"] = self._new_commit(repo, None, files, "initial commit", "").sha
        self.repos[(repo_type, repo_id)] = repo
        return _json({"url": self._repo_url(repo), "name": repo_id})

    def _delete_repo(self, req: _Request) -> _Response:
        body = req.json()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or req.user}/{body.get('name')}"
        self._writable(req, repo_type, repo_id)
        del self.repos[(repo_type, repo_id)]
        return _json({})

    def _validate_yaml(self, req: _Request) -> _Response:
        content = str(req.json().get("content", ""))
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and "---" not in (ln.strip() for ln in lines[1:]):
            errors = [{"message": "YAML metadata block is not closed by '---'"}]
            return _json({"errors": errors, "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    def _repo_info(self, req: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        repo = self._readable(req, repo_type, repo_id)
        commit = self._resolve(repo, rev)
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if req.flag("blobs"):
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs_sha256:
                    lfs = entry.tree_json(path)["lfs"]
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.lfs_sha256,
                                      "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id,
            "author": repo.owner, "sha": commit.sha, "lastModified": commit.date,
            "createdAt": repo.created, "private": repo.private, "gated": False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        return _json(info)

    def _tree(
        self, req: _Request, repo_type: str, repo_id: str, rev: str, prefix: str
    ) -> _Response:
        commit = self._resolve(self._readable(req, repo_type, repo_id), rev)
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        under = {p: e for p, e in commit.files.items() if p.startswith(base)}
        if base and not under:
            raise HubError(404, f"Path not found: {prefix}", "EntryNotFound")
        recursive, entries, dirs = req.flag("recursive"), [], set()
        for path, entry in under.items():
            parts = path[len(base) :].split("/")
            dirs.update(base + "/".join(parts[:i]) for i in range(1, len(parts)))
            if recursive or len(parts) == 1:
                entries.append(entry.tree_json(path))
        for d in dirs:
            if recursive or "/" not in d[len(base) :]:
                inner = sorted((p, e.oid) for p, e in commit.files.items() if p.startswith(d + "/"))
                oid = hashlib.sha1(json.dumps(inner).encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": d})
        return _json(sorted(entries, key=lambda e: e["path"]))

    def _paths_info(self, req: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        commit = self._resolve(self._readable(req, repo_type, repo_id), rev)
        form = parse_qs(req.body.decode())
        out = []
        for path in form.get("paths", []):
            if path in commit.files:
                out.append(commit.files[path].tree_json(path))
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                out.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": path})
        return _json(out)

    def _refs(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._readable(req, repo_type, repo_id)
        out: dict[str, list[dict[str, str]]] = {"branches": [], "converts": [], "tags": []}
        pulls: list[dict[str, str]] = []
        for ref, sha in sorted(repo.refs.items()):
            item = {"name": ref.removeprefix("refs/heads/"), "ref": ref, "targetCommit": sha}
            (out["branches"] if ref.startswith("refs/heads/") else pulls).append(item)
        if req.flag("include_prs"):
            out["pullRequests"] = pulls
        return _json(out)

    def _branch(self, req: _Request, repo_type: str, repo_id: str, name: str) -> _Response:
        repo, ref = self._writable(req, repo_type, repo_id), f"refs/heads/{name}"
        if req.method == "DELETE":
            if ref not in repo.refs:
                raise HubError(404, f"Branch not found: {name}", "RevisionNotFound")
            if name == "main":
                raise HubError(403, "Cannot delete the default branch")
            del repo.refs[ref]
            return _json({})
        if ref in repo.refs:
            raise HubError(409, f"Branch already exists: {name}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", name) or name.startswith("refs/"):
            raise HubError(400, f"Invalid branch name: {name!r}")
        repo.refs[ref] = self._resolve(repo, str(req.json().get("startingPoint") or "main")).sha
        return _json({})

    # -- uploads ---------------------------------------------------------------------------------
    def _preupload(self, req: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        commit = self._resolve(self._writable(req, repo_type, repo_id), rev)
        body = req.json()
        attributes = commit.files.get(".gitattributes")
        lfs_patterns = _patterns(self._content(attributes).decode(), True) if attributes else []
        ignore = body.get("gitIgnore")
        if ignore is None and ".gitignore" in commit.files:
            ignore = self._content(commit.files[".gitignore"]).decode()
        ignore_patterns = _patterns(ignore or "", False)
        out = []
        for item in body.get("files", []):
            path, size = str(item["path"]), int(item.get("size", 0))
            sample = base64.b64decode(item.get("sample", ""))
            lfs = _matches(path, lfs_patterns) or size > REGULAR_FILE_MAX or is_binary(sample)
            info: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular",
                                    "shouldIgnore": _matches(path, ignore_patterns)}
            existing = commit.files.get(path)
            if existing is not None:
                info["oid"] = existing.lfs_sha256 or existing.oid
            out.append(info)
        return _json({"files": out, "commitOid": commit.sha})

    def _sig(self, kind: str, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{kind}:{oid}:{size}".encode(), "sha256").hexdigest()

    def _signed(self, kind: str, oid: str, size: int, name: str = "") -> str:
        sig = self._sig(kind, oid, size)
        suffix = f"&name={quote(name)}" if name else ""
        return f"{self.storage_endpoint}/{kind}/{oid}?size={size}&sig={sig}{suffix}"

    def _lfs_batch(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        body = req.json()
        operation = body.get("operation")
        if operation == "upload":
            repo = self._writable(req, repo_type, repo_id)
        else:
            repo = self._readable(req, repo_type, repo_id)
        verify = f"{self._repo_url(repo)}.git/info/lfs/objects/verify"
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            item: dict[str, Any] = {"oid": oid, "size": size}
            if not (isinstance(oid, str) and _SHA256_RE.fullmatch(oid) and isinstance(size, int)):
                item["error"] = {"code": 422, "message": "Invalid oid or size"}
                item["oid"], item["size"] = str(oid), size if isinstance(size, int) else -1
            elif operation == "upload" and oid not in self.lfs_objects:
                item["actions"] = {
                    "upload": {"href": self._signed("upload", oid, size), "expires_in": 3600},
                    "verify": {"href": verify, "header": {}},
                }
            elif operation == "download":
                if oid in self.lfs_objects:
                    href = self._signed("download", oid, size)
                    item["actions"] = {"download": {"href": href, "expires_in": 3600}}
                else:
                    item["error"] = {"code": 404, "message": "Object does not exist"}
            objects.append(item)
        reply = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        return _json(reply, content_type="application/vnd.git-lfs+json")

    def _lfs_verify(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        self._writable(req, repo_type, repo_id)
        body = req.json()
        data = self.lfs_objects.get(str(body.get("oid")))
        if data is None or len(data) != body.get("size"):
            raise HubError(404, f"LFS object {body.get('oid')} not found or wrong size")
        return _json({"success": True}, content_type="application/vnd.git-lfs+json")

    def _commit(self, req: _Request, repo_type: str, repo_id: str, rev: str) -> _Response:
        repo = self._writable(req, repo_type, repo_id)
        lines = [json.loads(ln) for ln in req.body.splitlines() if ln.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        head = self._resolve(repo, rev)
        target = f"refs/heads/{rev}" if f"refs/heads/{rev}" in repo.refs else rev
        if target not in repo.refs:
            raise HubError(400, f"Cannot commit to {rev}: not a branch or pull request ref")
        parent = header.get("parentCommit")
        create_pr = req.flag("create_pr")
        if parent is not None and (parent not in repo.commits if create_pr else parent != head.sha):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        base = repo.commits[parent] if create_pr and parent else head
        files = dict(base.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = str(value.get("path", ""))
            if not path or path.startswith("/") or ".." in path.split("/") or "//" in path:
                raise HubError(400, f"Invalid path in commit: {path!r}")
            if key == "file":
                raw = value.get("content", "")
                data = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                if len(data) > REGULAR_FILE_MAX or is_binary(data[:512]):
                    raise HubError(400, f"{path}: binary or larger than 10 MiB; must be LFS")
                files[path] = self._store_regular(data)
            elif key == "lfsFile":
                oid = str(value.get("oid"))
                obj = self.lfs_objects.get(oid)
                if obj is None or value.get("size", len(obj)) != len(obj):
                    raise HubError(400, f"{path}: LFS object {oid} was not uploaded to storage")
                pointer = lfs_pointer(oid, len(obj))
                files[path] = FileEntry(len(obj), git_blob_sha1(pointer), oid)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}",
                                   "EntryNotFound")
            elif key == "deletedFolder":
                folder = path.rstrip("/") + "/"
                gone = [p for p in files if p.startswith(folder)]
                if not gone:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}",
                                   "EntryNotFound")
                for p in gone:
                    del files[p]
            else:
                raise HubError(400, f"Unknown commit operation: {key!r}")
        folders = {p[:i] for p in files for i, c in enumerate(p) if c == "/"}
        if clash := sorted(folders & files.keys()):
            raise HubError(400, f"A path is both a file and a folder: {clash[0]}")
        commit = self._new_commit(
            repo, base.sha, files, str(header.get("summary", "")), header.get("description", "")
        )
        reply: dict[str, Any] = {"success": True, "commitOid": commit.sha,
                                 "commitUrl": f"{self._repo_url(repo)}/commit/{commit.sha}"}
        if create_pr:
            repo.prs += 1
            repo.refs[f"refs/pr/{repo.prs}"] = commit.sha
            reply["pullRequestUrl"] = f"{self._repo_url(repo)}/discussions/{repo.prs}"
        else:
            repo.refs[target] = commit.sha
        return _json(reply)

    # -- downloads -------------------------------------------------------------------------------
    def _resolve_file(
        self, req: _Request, repo_type: str, repo_id: str, rev: str, path: str
    ) -> _Response:
        commit = self._resolve(self._readable(req, repo_type, repo_id), rev)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound",
                           **{"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{entry.oid}"'}
        if entry.lfs_sha256:  # like the Hub: redirect to a signed storage (CDN) URL
            name = path.rsplit("/", 1)[-1]
            location = self._signed("download", entry.lfs_sha256, entry.size, name)
            headers.update({"Location": location, "X-Linked-Etag": f'"{entry.lfs_sha256}"',
                            "X-Linked-Size": str(entry.size), "Content-Type": "text/plain"})
            return _Response(302, f"Found. Redirecting to {location}".encode(), headers)
        data = self.blobs[entry.oid]
        kind = "application/octet-stream" if is_binary(data[:512]) else "text/plain; charset=utf-8"
        headers["Content-Type"] = kind
        return _ranged(data, req.headers.get("Range"), headers)

    def _storage_route(self, req: _Request) -> _Response:
        if req.headers.get("Authorization"):
            raise HubError(400, "Only one auth mechanism allowed: signed URL, not Authorization")
        p = req.segs
        size = int(req.query.get("size", ["-1"])[0])
        if len(p) != 2 or p[0] not in ("upload", "download"):
            raise HubError(404, "NoSuchKey")
        kind, oid = p
        if not hmac.compare_digest(req.query.get("sig", [""])[0], self._sig(kind, oid, size)):
            raise HubError(403, "SignatureDoesNotMatch")
        if kind == "upload" and req.method == "PUT":
            if hashlib.sha256(req.body).hexdigest() != oid or len(req.body) != size:
                raise HubError(400, "BadDigest: body does not match the announced sha256/size")
            self.lfs_objects[oid] = req.body
            return _Response(200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})
        if kind == "download" and req.method in ("GET", "HEAD"):
            if oid not in self.lfs_objects:
                raise HubError(404, "NoSuchKey")
            name = req.query.get("name", ["blob"])[0]
            headers = {"ETag": f'"{oid}"', "Content-Type": "application/octet-stream",
                       "Content-Disposition": f'inline; filename="{name}";'}
            return _ranged(self.lfs_objects[oid], req.headers.get("Range"), headers)
        raise HubError(405, "MethodNotAllowed")


def _handler(hub: HubServer, server: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60

        def _read_body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                chunks = []
                while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length > 0 else b""

        def _handle(self) -> None:
            body = self._read_body()  # always drain: keep-alive would parse it as a request
            url = urlsplit(self.path)
            segs = [unquote(s) for s in url.path.split("/")[1:] if s]
            req = _Request(self.command, self.path, segs, parse_qs(url.query), self.headers, body)
            resp = hub._dispatch(server, req)
            record = RequestRecord(server, self.command, self.path, resp.status,
                                   bool(self.headers.get("Authorization")))
            with hub._lock:  # before answering, so a test sees it once the client returns
                hub.requests.append(record)
            self.send_response(resp.status)
            for key, value in resp.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(resp.body)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler


_SCRUBBED = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HUGGINGFACE_CO_STAGING",
    "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE",
    "TRANSFORMERS_CACHE", "HF_XET_CACHE", "HF_HUB_ENABLE_HF_TRANSFER", "HF_XET_HIGH_PERFORMANCE",
)


def client_env(
    hub: HubServer, hf_home: Path, token: str | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A full environment (``base`` or ``os.environ`` plus overrides) for a client subprocess.

    ``HF_ENDPOINT`` is read when huggingface_hub is first imported (and frozen into diffusers'
    module-level ``HfApi``), so pass this to ``subprocess.run(..., env=...)`` rather than setting
    it in the pytest process. Use a fresh ``hf_home`` per client: diffusers silently falls back to
    the local cache when the server fails, which can make a broken server look like a pass.
    """
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _SCRUBBED}
    no_proxy = ",".join(x for x in ("127.0.0.1,localhost", env.get("NO_PROXY")) if x)
    env.update({
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_DISABLE_XET": "1",  # else every upload goes through Xet (hf_xet is a hard dep)
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_TELEMETRY": "1",  # else GET /api/agent-harnesses
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_EXPERIMENTAL_WARNING": "1",
        "HF_HUB_ETAG_TIMEOUT": "30",
        "HF_HUB_DOWNLOAD_TIMEOUT": "30",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    })
    if token is not None:
        env["HF_TOKEN"] = token
    return env
