"""A Hub-compatible HTTP server for tests (in memory, 127.0.0.1, ephemeral port). Test code only.

It implements just what ``huggingface_hub``'s client calls for creating repos, committing files
and downloading them, enough for ``push_to_hub``/``from_pretrained`` round trips without internet::

    >>> with HubTestServer() as hub:
    ...     os.environ["HF_ENDPOINT"] = hub.url   # before huggingface_hub is imported, or
    ...     point_client_at(hub.url, cache_dir, monkeypatch)   # in a process that already imported it

Endpoints (model, dataset and space repos):

- ``POST /api/repos/create``                         create a repo (409 if it exists)
- ``GET  /api/whoami-v2``                            a fixed test user
- ``POST /api/validate-yaml``                        accepts any README metadata
- ``POST /api/{type}s/{repo}/preupload/{rev}``       every file is uploaded "regular" (inline); the
                                                     blob id of an existing file lets the client skip
                                                     unchanged files (no LFS or Xet storage)
- ``POST /api/{type}s/{repo}/commit/{rev}``          NDJSON commit: header, file, deletedFile/Folder;
                                                     ``parentCommit`` checked; ``create_pr=1`` supported
- ``POST|DELETE /api/{type}s/{repo}/branch/{name}``  create (from ``startingPoint`` or main) / delete
- ``GET  /api/{type}s/{repo}[/revision/{rev}]``      repo info (sha, siblings, tags, cardData)
- ``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]``   file listing (``recursive``)
- ``GET  /api/{type}s/{repo}/refs``                  branches
- ``GET  /api/{type}s/{repo}/commits/{rev}``         commit history
- ``HEAD|GET /[{type}s/]{repo}/resolve/{rev}/{path}`` file download with ``X-Repo-Commit``/``ETag``
  headers and single-range requests

Errors carry the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``) that the client maps to its exceptions. Authentication is not checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_SHA = re.compile(r"^[0-9a-f]{40}$")


def git_blob_id(data: bytes) -> str:
    """The git blob SHA-1 of ``data`` (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    files: dict[str, bytes]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    created: str = ""

    def resolve(self, revision: str) -> Optional[Commit]:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if _SHA.match(revision) and revision in self.commits:
            return self.commits[revision]
        return None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubState:
    """Repositories in memory; every method is called under ``lock``."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.Lock()
        self._counter = 0

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def commit(self, repo: Repo, revision: str) -> Commit:
        found = repo.resolve(revision)
        if found is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return found

    def new_commit(
        self, repo: Repo, parent: Optional[Commit], files: dict[str, bytes], title: str, message: str
    ) -> Commit:
        self._counter += 1
        h = hashlib.sha1(f"{repo.repo_id}|{parent.oid if parent else ''}|{self._counter}|{time.time_ns()}".encode())
        for path in sorted(files):
            h.update(path.encode() + git_blob_id(files[path]).encode())
        commit = Commit(h.hexdigest(), parent.oid if parent else None, files, title, message, _now())
        repo.commits[commit.oid] = commit
        return commit

    def create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, f"You already created this {repo_type} repo", None)
        repo = Repo(repo_id, repo_type, private, created=_now())
        first = self.new_commit(repo, None, {".gitattributes": _GITATTRIBUTES}, "initial commit", "")
        repo.branches["main"] = first.oid
        self.repos[(repo_type, repo_id)] = repo
        return repo


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    # ---- plumbing -------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes = b"", headers: Optional[dict[str, str]] = None, head: bool = False
    ) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: Optional[dict[str, str]] = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        segments = [unquote(s) for s in url.path.split("/")[1:]]  # unquote per segment: revisions hold "/"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        self.server.requests.append((method, url.path))
        try:
            with self.server.state.lock:
                self._route(method, segments, query, body)
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, json.dumps({"error": err.message}).encode(), headers, head=method == "HEAD")
        except Exception as exc:  # a bug in the test server: report it loudly to the client
            self._send(500, json.dumps({"error": f"test hub server error: {exc!r}"}).encode())
            raise

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_HEAD = lambda self: self._dispatch("HEAD")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731
    do_PUT = lambda self: self._dispatch("PUT")  # noqa: E731
    do_DELETE = lambda self: self._dispatch("DELETE")  # noqa: E731

    # ---- routing --------------------------------------------------------------------------

    def _route(self, method: str, seg: list[str], query: dict[str, str], body: bytes) -> None:
        state = self.server.state
        if seg[:1] == ["api"]:
            if seg[1:3] == ["repos", "create"] and method == "POST":
                return self._create_repo(json.loads(body or b"{}"))
            if seg[1:] == ["whoami-v2"]:
                user = {"type": "user", "name": "test-user", "orgs": [], "auth": {"type": "access_token"}}
                return self._json(200, user)
            if seg[1:] == ["validate-yaml"]:
                return self._json(200, {})
            if len(seg) >= 4 and seg[1] in _TYPES:
                repo = state.repo(_TYPES[seg[1]], f"{seg[2]}/{seg[3]}")
                action, rest = (seg[4], seg[5:]) if len(seg) > 4 else ("info", [])
                return self._repo_api(method, repo, action, rest, query, body)
            raise HubError(404, f"Unknown API route {'/'.join(seg)}")
        # /{repo}/resolve/{rev}/{path} (models) or /{type}s/{repo}/resolve/...
        repo_type = "model"
        if seg and seg[0] in _TYPES and len(seg) > 4 and seg[3] == "resolve":
            repo_type, seg = _TYPES[seg[0]], seg[1:]
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo = state.repo(repo_type, f"{seg[0]}/{seg[1]}")
            return self._resolve(method, repo, seg[3], "/".join(seg[4:]))
        raise HubError(404, f"Not found: /{'/'.join(seg)}")

    def _create_repo(self, payload: dict[str, Any]) -> None:
        name, org = payload.get("name"), payload.get("organization")
        if not name:
            raise HubError(400, "missing repo name")
        repo_id = f"{org or 'test-user'}/{name}"
        repo_type = payload.get("type") or "model"
        private = payload.get("private") or payload.get("visibility") == "private"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.server.url}/{prefix}{repo_id}"
        try:
            self.server.state.create(repo_type, repo_id, bool(private))
        except HubError as err:
            return self._json(409, {"error": err.message, "url": url})
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _repo_api(
        self, method: str, repo: Repo, action: str, rest: list[str], query: dict[str, str], body: bytes
    ) -> None:
        state = self.server.state
        if action == "info" or (action == "revision" and rest):
            commit = state.commit(repo, "/".join(rest) if rest else "main")
            return self._json(200, self._info(repo, commit))
        if action == "preupload" and method == "POST":
            commit = state.commit(repo, "/".join(rest))
            files = json.loads(body)["files"]
            return self._json(
                200,
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "regular",
                            "shouldIgnore": False,
                            "oid": git_blob_id(commit.files[f["path"]]) if f["path"] in commit.files else None,
                        }
                        for f in files
                    ]
                },
            )
        if action == "commit" and method == "POST":
            return self._commit(repo, "/".join(rest), query, body)
        if action == "branch" and rest:
            branch = "/".join(rest)
            if method == "POST":
                if branch in repo.branches:
                    raise HubError(409, f"Branch {branch} already exists")
                start = (json.loads(body) if body else {}).get("startingPoint") or "main"
                repo.branches[branch] = state.commit(repo, start).oid
                return self._json(200, {})
            if method == "DELETE":
                if repo.branches.pop(branch, None) is None:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                return self._json(200, {})
        if action == "tree" and method == "GET" and rest:
            commit = state.commit(repo, rest[0])
            recursive = query.get("recursive") in ("1", "true", "True")
            return self._json(200, self._tree(commit, "/".join(rest[1:]), recursive))
        if action == "refs" and method == "GET":
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
            return self._json(200, {"branches": branches, "converts": [], "tags": []})
        if action == "commits" and method == "GET" and rest:
            commit: Optional[Commit] = state.commit(repo, "/".join(rest))
            history = []
            while commit is not None:
                history.append(
                    {"id": commit.oid, "title": commit.title, "message": commit.message, "date": commit.date,
                     "authors": [{"user": "test-user"}]}
                )  # fmt: skip
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return self._json(200, history)
        raise HubError(404, f"Unknown repo API route {action}/{'/'.join(rest)}")

    def _info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        card_data, tags, library = None, [], None
        readme = commit.files.get("README.md")
        if readme is not None:
            card_data = _card_data(readme.decode("utf-8", "replace"))
            if card_data:
                tags, library = list(card_data.get("tags") or []), card_data.get("library_name")
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "sha": commit.oid,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "createdAt": repo.created,
            "lastModified": commit.date,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            if library:
                info["library_name"] = library
        if card_data is not None:
            info["cardData"] = card_data
        return info

    @staticmethod
    def _tree(commit: Commit, path: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for p, data in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rel_parts = p[len(prefix) :].split("/")
            for depth in range(1, len(rel_parts)):
                d = prefix + "/".join(rel_parts[:depth])
                if recursive or depth == 1:
                    oid = hashlib.sha1(d.encode()).hexdigest()
                    entries.setdefault(d, {"type": "directory", "oid": oid, "size": 0, "path": d})
            if recursive or len(rel_parts) == 1:
                entries[p] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": p}
        return list(entries.values())

    def _commit(self, repo: Repo, revision: str, query: dict[str, str], body: bytes) -> None:
        state = self.server.state
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        base = state.commit(repo, revision)
        parent = header.get("parentCommit")
        if parent and parent != base.oid:
            raise HubError(412, f"A commit has happened since {parent}. Please refresh and try again.")
        files = dict(base.files)
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value", {})
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for p in [p for p in files if p.startswith(folder)]:
                    del files[p]
            else:
                raise HubError(400, f"The test hub server stores regular files only, not {key!r}")
        commit = state.new_commit(repo, base, files, header.get("summary", ""), header.get("description", ""))
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        pr_url = None
        if query.get("create_pr") in ("1", "true"):
            number = 1 + sum(1 for b in repo.branches if b.startswith("refs/pr/"))
            repo.branches[f"refs/pr/{number}"] = commit.oid
            pr_url = f"{self.server.url}/{prefix}{repo.repo_id}/discussions/{number}"
        else:
            branch = revision if revision in repo.branches else None
            if branch is None:
                raise HubError(400, f"Cannot commit to {revision}: not a branch")
            repo.branches[branch] = commit.oid
        self._json(
            200,
            {
                "commitUrl": f"{self.server.url}/{prefix}{repo.repo_id}/commit/{commit.oid}",
                "commitOid": commit.oid,
                "pullRequestUrl": pr_url,
            },
        )

    def _resolve(self, method: str, repo: Repo, revision: str, path: str) -> None:
        commit = self.server.state.commit(repo, revision)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        etag = git_blob_id(data)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
        }
        status, payload = 200, data
        match = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if match and method == "GET":
            start = int(match.group(1))
            stop = int(match.group(2)) + 1 if match.group(2) else len(data)
            status, payload = 206, data[start:stop]
            headers["Content-Range"] = f"bytes {start}-{start + len(payload) - 1}/{len(data)}"
        self._send(status, payload, headers, head=method == "HEAD")


def _card_data(readme: str) -> Optional[dict[str, Any]]:
    match = re.match(r"^\s*---\s*\n(.*?)\n---\s*\n", readme, re.S)
    if not match:
        return None
    try:
        import yaml  # a huggingface_hub dependency

        data = yaml.safe_load(match.group(1))
    except Exception:
        return None
    return data if isinstance(data, dict) else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    requests: list[tuple[str, str]]
    url: str


class HubTestServer:
    """The test Hub on ``127.0.0.1:<ephemeral port>``; ``url`` is the value for ``HF_ENDPOINT``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.state = HubState()
        self._server.requests = []
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._server.url = self.url
        self._thread: Optional[threading.Thread] = None

    @property
    def state(self) -> HubState:
        return self._server.state

    @property
    def requests(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request received, in order."""
        return self._server.requests

    def start(self) -> "HubTestServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubTestServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (a branch or commit sha)."""
        with self.state.lock:
            repo = self.state.repo(repo_type, repo_id)
            return dict(self.state.commit(repo, revision).files)

    def history(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> list[str]:
        """Commit shas of ``branch``, newest first."""
        with self.state.lock:
            repo = self.state.repo(repo_type, repo_id)
            oid: Optional[str] = repo.branches[branch]
            out = []
            while oid:
                out.append(oid)
                oid = repo.commits[oid].parent
            return out


def point_client_at(url: str, cache_dir: str, monkeypatch: Any) -> None:
    """Make an already-imported ``huggingface_hub`` talk to ``url``, as ``HF_ENDPOINT=url`` would.

    ``huggingface_hub`` reads ``HF_ENDPOINT``/``HF_HUB_OFFLINE``/``HF_HUB_CACHE`` when it is imported;
    a new process only needs the environment variables (set here too, for subprocesses).
    """
    from huggingface_hub import constants, hf_api

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", cache_dir)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache_dir)
    monkeypatch.setattr(hf_api.api, "endpoint", url)  # the shared HfApi behind huggingface_hub.file_exists & co.
    try:
        import transformers.utils.hub as tf_hub

        monkeypatch.setattr(tf_hub, "_hf_api", None, raising=False)
    except ImportError:
        pass


if __name__ == "__main__":  # manual use: python tests/hub_server.py, then HF_ENDPOINT=<url> ...
    with HubTestServer(port=int(os.environ.get("PORT", "0"))) as hub:
        print(f"test hub server on {hub.url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
