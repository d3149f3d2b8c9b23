"""A loopback stand-in for the Hugging Face Hub, for tests that push and pull without the internet.

`LoopbackHub` serves, from memory, the part of the Hub's HTTP API that `huggingface_hub` uses to create a repo,
upload a folder, download files and read repo info; timm's `hf-hub:` loader and transformers' `from_pretrained` go
through the same calls. It binds 127.0.0.1 on a free port, and stops itself after `timeout` seconds even if a test
forgets to, so no test can leave a server behind.

`huggingface_hub` reads `HF_ENDPOINT` when it is imported, so point a *subprocess* at the server with `hub.env(...)`:

```python
from hub_server import LoopbackHub

with LoopbackHub() as hub:
    subprocess.run([sys.executable, "push.py"], env=hub.env(hf_home=tmp_path / "hf"), check=True, timeout=120)
    files = hub.files("user/tiny")          # {"README.md": b"...", "config.json": b"...", ...}
    hub.upload("user/teacher", {"config.json": b"{...}"})   # seed a repo for a pull-only test
```

What the server implements, and what it does not:
- `POST /api/repos/create` (409 when the repo exists, which `create_repo(exist_ok=True)` accepts).
- `POST /api/validate-yaml`: parses the README's YAML header and answers 400 with the parse error, like the Hub.
- `POST /api/{type}s/{repo}/preupload/{rev}` answers `uploadMode: "regular"` for every file, so clients send all
  content base64 inside the NDJSON commit; LFS and Xet uploads are not implemented (run clients with
  `HF_HUB_DISABLE_XET=1`, which `env()` sets).
- `POST /api/{type}s/{repo}/commit/{rev}`: `file` and `deletedFile`/`deletedFolder` operations.
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with the `X-Repo-Commit`, `ETag` and `Content-Length` headers that
  `hf_hub_download` requires, and `X-Error-Code` on 404 so clients raise the right error class.
- `GET /api/{type}s/{repo}[/revision/{rev}]` (repo info with `siblings`) and `GET .../tree/{rev}[/{path}]`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["LoopbackHub"]

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def _blob_oid(content: bytes) -> str:
    # The id git gives a regular file; the Hub returns it as the ETag of non-LFS files.
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _Repo:
    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.repo_type, self.repo_id, self.private = repo_type, repo_id, private
        self.commits: list[tuple[str, dict[str, bytes]]] = []
        self.commit({}, "initial commit")

    def commit(self, files: dict[str, bytes], message: str) -> str:
        parent = self.commits[-1][0] if self.commits else ""
        digest = hashlib.sha1(f"{parent}\n{message}\n{time.time_ns()}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{_blob_oid(files[path])}\n".encode())
        sha = digest.hexdigest()
        self.commits.append((sha, dict(files)))
        return sha

    def snapshot(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision in ("main", "HEAD"):
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == revision), None)


class LoopbackHub:
    """An in-memory Hub on `http://127.0.0.1:<free port>`, as a context manager.

    Args:
        timeout: seconds after which the server shuts itself down, whatever the test does.
        user: the namespace of repos created without one, and the name `whoami` returns.

    Attributes:
        endpoint: the base URL, for `HF_ENDPOINT`.
        requests: `(method, path)` of every request served, in order, for assertions and debugging.
    """

    def __init__(self, *, timeout: float = 300.0, user: str = "user"):
        self.timeout = timeout
        self.user = user
        self.requests: list[tuple[str, str]] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self.endpoint = ""

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> LoopbackHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.timeout, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    # ------------------------------------------------------------------------------------------------- state
    def env(self, hf_home: str | os.PathLike, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess that should talk to this server, with its own empty `HF_HOME`."""
        env = dict(os.environ if base is None else base)
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HUB_OFFLINE="0",
            TRANSFORMERS_OFFLINE="0",
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HOME=str(hf_home),
            HF_TOKEN="hf_loopback_test_token",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        return env

    def repos(self, repo_type: str = "model") -> list[str]:
        with self._lock:
            return sorted(rid for (rtype, rid) in self._repos if rtype == repo_type)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of `repo_id` at `revision`, path -> content. Raises KeyError for an unknown repo or revision."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"no {repo_type} repo {repo_id!r} on the loopback hub; it has {sorted(self._repos)}")
            snap = repo.snapshot(revision)
            if snap is None:
                raise KeyError(f"repo {repo_id!r} has no revision {revision!r}")
            return dict(snap[1])

    def commits(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Commit ids of `repo_id`, oldest first; the first is the empty commit that creating the repo makes."""
        with self._lock:
            return [sha for sha, _ in self._repos[(repo_type, repo_id)].commits]

    def upload(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", message: str = "seed") -> str:
        """Create `repo_id` if needed and commit `files` to it directly; returns the commit id."""
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), _Repo(repo_type, repo_id, private=False))
            merged = {**repo.commits[-1][1], **files}
            return repo.commit(merged, message)


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may sit idle or half-sent before the server drops it

    def log_message(self, format, *args) -> None:  # silence the default stderr access log
        pass

    # ------------------------------------------------------------------------------------------------ helpers
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None, head: bool = False):
        self._send(status, json.dumps(obj).encode(), headers, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False, commit: str | None = None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._json(status, {"error": message}, headers, head)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _repo(self, repo_type: str, repo_id: str) -> _Repo | None:
        return self.hub._repos.get((repo_type, repo_id))

    # ------------------------------------------------------------------------------------------------ routing
    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        self.hub.requests.append((method, url.path))
        body = self._body() if method == "POST" else b""
        try:
            with self.hub._lock:
                self._dispatch(method, parts, parse_qs(url.query), body)
        except (ConnectionError, TimeoutError):  # the client went away; nothing to answer
            pass
        except Exception as err:  # a bug in this test server: answer 500 so the client fails loudly
            self._error(500, None, f"loopback hub error: {type(err).__name__}: {err}")

    def _dispatch(self, method: str, parts: list[str], query: dict, body: bytes) -> None:
        head = method == "HEAD"
        if parts[:1] == ["api"]:
            return self._api(method, parts[1:], query, body)
        # File downloads: /{ns}/{name}/resolve/{rev}/{path}, with "datasets/" or "spaces/" in front for those types.
        repo_type = "model"
        if parts and parts[0] in ("datasets", "spaces"):
            repo_type, parts = _TYPES[parts[0]], parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        return self._error(404, None, f"no route for {method} {self.path}", head)

    def _api(self, method: str, parts: list[str], query: dict, body: bytes) -> None:
        if parts == ["repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if parts == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if parts == ["whoami-v2"]:
            return self._json(200, {"type": "user", "name": self.hub.user, "orgs": [], "auth": {}})
        if len(parts) >= 3 and parts[0] in _TYPES:
            repo_type, repo_id, rest = _TYPES[parts[0]], f"{parts[1]}/{parts[2]}", parts[3:]
            repo = self._repo(repo_type, repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", method == "HEAD")
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo, json.loads(body))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo, rest[1], body)
            if method == "GET" and not rest:
                return self._info(repo, "main")
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._info(repo, rest[1])
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo, rest[1], "/".join(rest[2:]), query)
        return self._error(404, None, f"no route for {method} /api/{'/'.join(parts)}", method == "HEAD")

    # ----------------------------------------------------------------------------------------------- endpoints
    def _create_repo(self, payload: dict) -> None:
        namespace = payload.get("organization") or self.hub.user
        repo_id = f"{namespace}/{payload['name']}"
        repo_type = payload.get("type") or "model"
        key = (repo_type, repo_id)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        answer = {"url": f"{self.hub.endpoint}/{prefix}{repo_id}", "name": repo_id}
        if key in self.hub._repos:  # like the Hub, the conflict still names the repo: exist_ok callers read the url
            msg = "You already created this model repo"
            return self._json(409, {**answer, "error": msg}, {"X-Error-Message": msg})
        self.hub._repos[key] = _Repo(repo_type, repo_id, private=payload.get("visibility") == "private")
        self._json(200, answer)

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        if content.startswith("---"):
            header = content.split("---", 2)[1]
            try:
                meta = yaml.safe_load(header)
            except yaml.YAMLError as err:
                return self._json(400, {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []})
            if meta is not None and not isinstance(meta, dict):
                return self._json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, repo: _Repo, payload: dict) -> None:
        current = repo.commits[-1][1]
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": _blob_oid(current[f["path"]]) if f["path"] in current else None,
            }
            for f in payload.get("files", [])
        ]
        self._json(200, {"files": files, "commitOid": repo.commits[-1][0]})

    def _commit(self, repo: _Repo, revision: str, body: bytes) -> None:
        if revision != "main":
            return self._error(400, None, f"the loopback hub only commits to main, not {revision!r}")
        files = dict(repo.commits[-1][1])
        message = "commit"
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary") or message
            elif key == "file":
                content = value["content"]
                files[value["path"]] = base64.b64decode(content) if value.get("encoding") == "base64" else content
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:
                return self._error(400, None, f"the loopback hub does not implement commit operation {key!r}")
        sha = repo.commit(files, message)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        url = f"{self.hub.endpoint}/{prefix}{repo.repo_id}/commit/{sha}"
        self._json(200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None, "success": True})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
        snap = repo.snapshot(revision)
        if snap is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        sha, files = snap
        if path not in files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", head, commit=sha)
        content = files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": sha,
            "ETag": f'"{_blob_oid(content)}"',
        }
        self._send(200, content, headers, head)

    def _info(self, repo: _Repo, revision: str) -> None:
        snap = repo.snapshot(revision)
        if snap is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        sha, files = snap
        self._json(
            200,
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": sha,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "siblings": [{"rfilename": p, "size": len(c)} for p, c in sorted(files.items())],
            },
        )

    def _tree(self, repo: _Repo, revision: str, path: str, query: dict) -> None:
        snap = repo.snapshot(revision)
        if snap is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        _, files = snap
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.rstrip("/") + "/" if path else ""
        entries, folders = [], set()
        for p, content in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :]
            if "/" in rel and not recursive:
                folders.add(prefix + rel.split("/", 1)[0])
                continue
            if recursive:
                parents = Path(rel).parents
                folders.update(prefix + str(parent) for parent in parents if str(parent) != ".")
            entries.append({"type": "file", "path": p, "size": len(content), "oid": _blob_oid(content)})
        entries += [{"type": "directory", "path": f, "oid": _blob_oid(f.encode()), "size": 0} for f in sorted(folders)]
        self._json(200, entries)
