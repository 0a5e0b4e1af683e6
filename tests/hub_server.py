"""A local Hugging Face Hub for the tests: enough of the HTTP API for the real
`huggingface_hub`, `transformers` and `datasets` clients to create repos, commit files
(regular and LFS), and download them back by branch or commit sha.

Everything is kept in memory; every commit keeps its whole file tree, so a client that
resolves `main` to a sha and then fetches by sha sees one consistent snapshot. Start it
with `HubServer().start()` and point the clients at `server.endpoint` through
`HF_ENDPOINT` (see `../shared/HUB_PROTOCOL.md` for the calls and their order).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

ACTIONS = ("preupload", "commit", "revision", "tree", "paths-info", "refs", "commits", "tag")
BINARY_SUFFIXES = (".safetensors", ".parquet", ".bin", ".pt", ".pth", ".npy", ".png", ".arrow", ".zip", ".gz")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


@dataclass
class Commit:
    oid: str
    title: str
    message: str
    parent: str | None
    files: dict[str, Blob]
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.tags:
            return self.commits[self.tags[revision]]
        return self.commits.get(revision)


class HubState:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization header
        self.require_token = False  # writes without a token get 401
        self.owners: dict[tuple[str, str], str | None] = {}  # repo -> the token that created it (others get 403 on writes)
        self.failures: list[tuple[str, int]] = []  # (path fragment, status): fail the next matching request once

    def new_commit(self, repo: Repo, title: str, message: str, parent: str | None, files: dict[str, Blob], branch: str = "main") -> Commit:
        seed = f"{repo.repo_type}/{repo.repo_id}:{len(repo.commits)}:{time.time_ns()}:{title}".encode()
        commit = Commit(oid=hashlib.sha1(seed).hexdigest(), title=title, message=message, parent=parent, files=files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


class HubServer:
    """`with HubServer() as hub:` or `hub = HubServer().start()`; `hub.endpoint` is its URL."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://{host}:{self.httpd.server_address[1]}"
        handler.endpoint = self.endpoint
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_next(self, path_fragment: str, status: int = 500) -> None:
        """Answer the next request whose path contains `path_fragment` with `status` (once)."""
        with self.state.lock:
            self.state.failures.append((path_fragment, status))

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision (for assertions)."""
        repo = self.state.repos[(repo_type, repo_id)]
        return {path: blob.data for path, blob in repo.resolve(revision).files.items()}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState
    endpoint: str

    def log_message(self, format, *args) -> None:  # keep test output quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(payload).encode(), headers, head=head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False, headers: dict | None = None) -> None:
        extra = dict(headers or {})
        if code:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._json(status, {"error": message}, extra, head=head)

    def _split(self) -> tuple[list[str], dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return [unquote(p) for p in parts.path.split("/")[1:]], parse_qs(parts.query)

    def _repo(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.state.repos.get((repo_type, repo_id))

    def _record(self) -> None:
        with self.state.lock:
            self.state.requests.append((self.command, self.path, self.headers.get("Authorization")))

    # ------------------------------------------------------------------ routing
    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_POST(self) -> None:
        self._route(head=False)

    def do_PUT(self) -> None:
        self._record()
        if self._injected_failure():
            return
        segments, _ = self._split()
        if len(segments) == 2 and segments[0] == "lfs-upload":
            data = self._body()
            oid = segments[1]
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, f"content does not match LFS oid {oid}")
            with self.state.lock:
                self.state.lfs[oid] = data
            return self._send(200)
        self._error(404, None, f"no PUT route for {self.path}")

    def _injected_failure(self) -> bool:
        with self.state.lock:
            for i, (fragment, status) in enumerate(self.state.failures):
                if fragment in self.path:
                    del self.state.failures[i]
                    if self.command in ("POST", "PUT"):
                        self._body()
                    # No body after a HEAD: the client reads none, and would take it for the next answer.
                    self._error(status, None, f"injected failure {status} for {self.path}", head=self.command == "HEAD")
                    return True
        return False

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _may_write(self, repo_type: str, repo_id: str) -> bool:
        """401 without a token (when tokens are required), 403 for a repo another token created."""
        token = self._token()
        if self.state.require_token and not token:
            self._body()
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        owner = self.state.owners.get((repo_type, repo_id))
        if owner is not None and token != owner:
            self._body()
            self._error(403, None, f"You don't have the rights to write to {repo_id}")
            return False
        return True

    def _route(self, head: bool) -> None:
        self._record()
        if self._injected_failure():
            return
        segments, query = self._split()
        try:
            if segments[:1] == ["api"]:
                return self._api(segments[1:], query, head)
            if len(segments) >= 2 and segments[-4:-1] == ["info", "lfs", "objects"] and segments[-1] == "batch":
                return self._lfs_batch(segments)
            repo_type = "model"
            if segments[:1] == ["datasets"]:
                repo_type, segments = "dataset", segments[1:]
            if "resolve" in segments:
                i = segments.index("resolve")
                return self._resolve(repo_type, "/".join(segments[:i]), segments[i + 1], "/".join(segments[i + 2 :]), head)
        except Exception as err:  # noqa: BLE001 - a bug in the fixture should show up as a 500, not hang a client
            return self._error(500, None, f"{type(err).__name__}: {err}", head=head)
        self._error(404, None, f"no route for {self.command} {self.path}", head=head)

    def _api(self, segments: list[str], query, head: bool) -> None:
        if segments == ["repos", "create"] and self.command == "POST":
            if self.state.require_token and not self._token():
                self._body()
                return self._error(401, None, "Invalid credentials in Authorization header")
            return self._create_repo(json.loads(self._body() or b"{}"))
        if segments == ["validate-yaml"] and self.command == "POST":
            self._body()
            return self._json(200, {"errors": [], "warnings": []})
        if segments == ["whoami-v2"]:
            return self._json(200, {"name": "tester", "type": "user", "orgs": [], "auth": {"accessToken": {"role": "write"}}})
        if not segments or segments[0] not in ("models", "datasets", "spaces"):
            return self._error(404, None, f"no API route {'/'.join(segments)}", head=head)
        repo_type = {"models": "model", "datasets": "dataset", "spaces": "space"}[segments[0]]
        rest = segments[1:]
        action_at = next((i for i, s in enumerate(rest) if s in ACTIONS and i >= 1), len(rest))
        repo_id, action, args = "/".join(rest[:action_at]), (rest[action_at] if action_at < len(rest) else None), rest[action_at + 1 :]
        with self.state.lock:
            repo = self._repo(repo_type, repo_id)
            if repo is None:
                if self.command == "POST":
                    self._body()  # read the request through, so the connection can be reused
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
            if action is None or action == "revision":
                revision = unquote(args[0]) if args else "main"
                return self._repo_info(repo, revision, head)
            if action in ("preupload", "commit", "tag") and not self._may_write(repo_type, repo_id):
                return None
            if action == "tag":  # HfApi.create_tag: POST .../tag/{revision} {"tag", "message"?}
                commit = repo.resolve(unquote(args[0]) if args else "main")
                name = json.loads(self._body() or b"{}").get("tag")
                if commit is None:
                    return self._error(404, "RevisionNotFound", "revision not found")
                if not name or name in repo.tags or name in repo.branches:
                    return self._error(409, None, f"tag {name!r} already exists or is empty")
                repo.tags[name] = commit.oid
                return self._json(200, {})
            if action == "preupload":
                return self._preupload(json.loads(self._body() or b"{}"))
            if action == "commit":
                create_pr = (query.get("create_pr") or ["0"])[0] == "1"
                return self._commit(repo, args[0] if args else "main", self._body(), create_pr)
            if action in ("tree", "paths-info"):
                revision = args[0] if args else "main"
                commit = repo.resolve(revision)
                if commit is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
                if action == "tree":
                    recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
                    return self._tree(commit, "/".join(args[1:]), recursive, head)
                form = parse_qs(self._body().decode())
                return self._json(200, self._entries(commit, form.get("paths", []), exact=True), head=head)
            if action == "refs":
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
                tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": oid} for t, oid in repo.tags.items()]
                return self._json(200, {"branches": branches, "tags": tags, "converts": [], "pullRequests": []}, head=head)
            if action == "commits":
                commit = repo.resolve(args[0] if args else "main")
                if commit is None:
                    return self._error(404, "RevisionNotFound", "revision not found", head=head)
                history = []
                while commit is not None:
                    history.append({"id": commit.oid, "title": commit.title, "message": commit.message, "date": _iso(commit.date), "authors": []})
                    commit = repo.commits.get(commit.parent) if commit.parent else None
                return self._json(200, history, head=head)
        self._error(404, None, f"no API route {'/'.join(segments)}", head=head)

    # ------------------------------------------------------------------ handlers
    def _create_repo(self, payload: dict) -> None:
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else name
        repo_type = payload.get("type") or "model"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        with self.state.lock:
            if (repo_type, repo_id) in self.state.repos:
                return self._json(409, {"error": "You already created this repo", "url": f"{self.endpoint}/{prefix}{repo_id}"})
            # huggingface_hub 2.x sends "visibility", older clients "private".
            private = bool(payload.get("private")) or payload.get("visibility") == "private"
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
            gitattributes = Blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.parquet filter=lfs diff=lfs merge=lfs -text\n", lfs=False)
            self.state.new_commit(repo, "initial commit", "", None, {".gitattributes": gitattributes})
            self.state.repos[(repo_type, repo_id)] = repo
            self.state.owners[(repo_type, repo_id)] = self._token()
        self._json(200, {"url": f"{self.endpoint}/{prefix}{repo_id}"})

    def _repo_info(self, repo: Repo, revision: str, head: bool) -> None:
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        siblings = []
        for path, blob in sorted(commit.files.items()):
            entry = {"rfilename": path, "size": len(blob.data), "blobId": git_blob_sha1(blob.data)}
            if blob.lfs:
                entry["lfs"] = {"sha256": blob.etag, "size": len(blob.data), "pointerSize": 134}
            siblings.append(entry)
        info = {
            "id": repo.repo_id,
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "sha": commit.oid,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": _iso(commit.date),
            "createdAt": _iso(min(c.date for c in repo.commits.values())),
            "siblings": siblings,
        }
        self._json(200, info, head=head)

    def _preupload(self, payload: dict) -> None:
        files = []
        for item in payload.get("files", []):
            path, size = item.get("path", ""), int(item.get("size") or 0)
            lfs = size > 4096 or path.endswith(BINARY_SUFFIXES)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": None})
        self._json(200, {"files": files, "commitOid": None})

    def _lfs_batch(self, segments: list[str]) -> None:
        payload = json.loads(self._body() or b"{}")
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs:
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}", "expires_in": 3600}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(), content_type="application/vnd.git-lfs+json")

    def _commit(self, repo: Repo, revision: str, body: bytes, create_pr: bool = False) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), {})
        branch = revision if revision not in repo.commits else "main"
        base = repo.resolve(branch)
        pr_number = None
        if create_pr:  # the commit goes to a new refs/pr/N branch, on top of `revision`
            pr_number = 1 + sum(name.startswith("refs/pr/") for name in repo.branches)
            branch = f"refs/pr/{pr_number}"
        parent = header.get("parentCommit")
        if parent and base is not None and parent != base.oid:
            return self._error(412, None, f"parentCommit {parent} is not the head of {branch}")
        files = dict(base.files) if base is not None else {}
        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode(), lfs=False)
            elif key == "lfsFile":
                data = self.state.lfs.get(value["oid"])
                if data is None:
                    return self._error(400, None, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = Blob(data, lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(folder)}
        commit = self.state.new_commit(repo, header.get("summary", ""), header.get("description", ""), base.oid if base else None, files, branch)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        pr_url = f"{self.endpoint}/{prefix}{repo.repo_id}/discussions/{pr_number}" if pr_number else None
        self._json(200, {"commitOid": commit.oid, "commitUrl": f"{self.endpoint}/{prefix}{repo.repo_id}/commit/{commit.oid}", "pullRequestUrl": pr_url})

    def _entries(self, commit: Commit, paths: list[str], exact: bool) -> list[dict]:
        out, seen_dirs = [], set()
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                out.append(_file_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files) and path not in seen_dirs:
                seen_dirs.add(path)
                out.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path})
        return out

    def _tree(self, commit: Commit, folder: str, recursive: bool, head: bool) -> None:
        folder = folder.strip("/")
        prefix = folder + "/" if folder else ""
        inside = {p: b for p, b in commit.files.items() if p.startswith(prefix)}
        if folder and not inside:
            return self._error(404, "EntryNotFound", f"{folder} does not exist", head=head)
        out, dirs = [], set()
        for path, blob in sorted(inside.items()):
            rest = path[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                d = prefix + "/".join(parts[:depth])
                if d not in dirs and (recursive or depth == 1):
                    dirs.add(d)
                    out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
            if recursive or len(parts) == 1:
                out.append(_file_entry(path, blob))
        self._json(200, out, head=head)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, head: bool) -> None:
        with self.state.lock:
            repo = self._repo(repo_type, repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
            commit = repo.resolve(revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            blob = commit.files.get(path)
        if blob is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}", head=head, headers={"X-Repo-Commit": commit.oid})
        data, status = blob.data, 200
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.etag}"'
            headers["X-Linked-Size"] = str(len(blob.data))
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes=") and not head:
            start_text, _, end_text = wanted[len("bytes=") :].partition("-")
            start = int(start_text or 0)
            end = int(end_text) if end_text else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream", head=head)


def _file_entry(path: str, blob: Blob) -> dict:
    entry = {"type": "file", "oid": git_blob_sha1(blob.data), "size": len(blob.data), "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.etag, "size": len(blob.data), "pointerSize": 134}
    return entry


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(timestamp))
