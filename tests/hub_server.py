"""A loopback fake of the Hugging Face Hub: just enough of its REST API for `huggingface_hub` (2.x) uploads.

It binds 127.0.0.1 on a free port, keeps repositories, branches and commits in memory, and answers:

    POST /api/repos/create                                  create a model repo (initial commit: .gitattributes)
    POST /api/validate-yaml                                 check the metadata block of a README
    POST /api/models/{ns}/{name}/preupload/{rev}            upload mode of each file: always "regular", so file
                                                            contents travel base64-inline in the commit (no LFS/xet)
    POST /api/models/{ns}/{name}/commit/{rev}               NDJSON commit: applied all-or-nothing to the branch
    POST /api/models/{ns}/{name}/branch/{branch}            create a branch (409 when it exists)
    GET  /api/models/{ns}/{name}/refs                       branches
    GET  /api/models/{ns}/{name}[/revision/{rev}]           repo info (sha, siblings)
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]        files and folders (what `list_repo_files` reads)
    GET|HEAD /{ns}/{name}/resolve/{rev}/{path}              file download (what `hf_hub_download` asks for)

`FakeHub.fail_commits = True` makes the commit endpoint answer HTTP 500 without touching any branch, to test that a
failed upload leaves the repository unchanged. `FakeHub.write_cache` lays a branch out as the Hub client's cache
(`models--ns--name/{blobs,refs,snapshots}`) so `from_pretrained("ns/name")` resolves it with `HF_HUB_OFFLINE=1`.

A failing world: ``FakeHub.faults[ENDPOINT] = STALL`` makes that endpoint (a name of `ENDPOINTS`, or ``"*"`` for all)
read the request and never answer (until the hub stops, at most `STALL_LIMIT_S`); ``= STATUS`` (an int) answers
an HTML page with that HTTP status, as a proxy, a captive portal or a failing load balancer does. Nothing is
applied to any repository then. The server stops itself after ``lifetime_s`` (default 10 minutes) if no one stops
it, so a test that hangs never leaves it running.
"""

import base64
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from huggingface_hub import constants

_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_SHA = re.compile(r"^[0-9a-f]{40}$")

# What `FakeHub.faults` may name: one per REST endpoint above.
ENDPOINTS = ("create", "validate-yaml", "info", "refs", "tree", "preupload", "commit", "branch", "resolve")
STALL = "stall"
STALL_LIMIT_S = 60.0  # a stalled request is dropped after this, unanswered, if the hub is not stopped first


def git_blob_sha(data: bytes) -> str:
    """git's object id of a file (what the Hub reports as the oid/etag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    files: dict[str, bytes]  # the whole tree after this commit
    changed: list[str] = field(default_factory=list)  # paths this commit added, replaced or deleted


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)  # oid -> commit, in creation order
    branches: dict[str, str] = field(default_factory=dict)  # branch -> head oid

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision if revision in self.commits else None)
        return self.commits.get(oid) if oid else None

    def add_commit(self, branch, parent: Commit | None, title, description, files: dict, changed: list) -> Commit:
        oid = hashlib.sha1(f"{uuid.uuid4()}".encode()).hexdigest()
        commit = Commit(oid, parent.oid if parent else None, title, description, files, changed)
        self.commits[oid] = commit
        self.branches[branch] = oid
        return commit


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra


class FakeHub:
    """Start with ``with FakeHub() as hub:`` (or ``start()``/``stop()``); ``hub.url`` is the endpoint."""

    def __init__(self, lifetime_s: float = 600.0):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.fail_commits = False
        self.faults: dict[str, str | int] = {}  # endpoint (or "*") -> STALL or an HTTP status answered with HTML
        self.lifetime_s = lifetime_s
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        self._stopped.clear()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        self._stopped.set()  # stalled requests return (unanswered) at once
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection
    def commits(self, repo_id: str) -> list[Commit]:
        return list(self.repos[repo_id].commits.values())

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].resolve(revision).files)

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def write_cache(self, repo_id: str, cache_dir, revision: str = "main") -> Path:
        """Lay out ``repo_id`` at ``revision`` as `huggingface_hub`'s cache does; returns the snapshot folder."""
        repo = self.repos[repo_id]
        commit = repo.resolve(revision)
        root = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        snapshot = root / "snapshots" / commit.oid
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        for path, data in commit.files.items():
            blob = root / "blobs" / git_blob_sha(data)
            blob.write_bytes(data)
            target = snapshot / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(Path("../" * (len(Path(path).parts) + 1)) / "blobs" / blob.name)
        (root / "refs").mkdir(exist_ok=True)
        if not _SHA.fullmatch(revision):
            (root / "refs" / revision).write_text(commit.oid)
        return snapshot

    # ------------------------------------------------------------------ endpoints
    @staticmethod
    def endpoint(path: str) -> str | None:
        """The name in `ENDPOINTS` of the endpoint ``path`` asks for (None for an unknown path)."""
        parts = path.strip("/").split("/")
        if parts == ["api", "repos", "create"]:
            return "create"
        if parts == ["api", "validate-yaml"]:
            return "validate-yaml"
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            action = parts[4] if len(parts) > 4 else "info"
            return "info" if action == "revision" else action if action in ENDPOINTS else None
        return "resolve" if len(parts) >= 5 and parts[2] == "resolve" else None

    def fault(self, path: str) -> str | int | None:
        """What the fault injected for ``path``'s endpoint is (`STALL`, an HTTP status), or None."""
        return self.faults.get(self.endpoint(path) or "", self.faults.get("*"))

    def stall(self, method: str, path: str) -> None:
        """Hold a request unanswered until the hub stops (at most `STALL_LIMIT_S`)."""
        with self._lock:
            self.requests.append((method, path))
        self._stopped.wait(STALL_LIMIT_S)

    def handle(self, method: str, path: str, query: dict, headers, body: bytes):
        """Returns (status, json-able payload or bytes, extra headers)."""
        parts = [unquote(p) for p in path.strip("/").split("/")]
        with self._lock:
            self.requests.append((method, path))
            if isinstance(self.fault(path), int):
                status = self.fault(path)
                page = f"<!DOCTYPE html><html><head><title>{status}</title></head><body>Gateway</body></html>"
                return status, page.encode(), {"Content-Type": "text/html; charset=utf-8"}
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._create_repo(headers, json.loads(body or b"{}"))
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return self._validate_yaml(json.loads(body))
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo = self._repo(f"{parts[2]}/{parts[3]}")
                action, rest = (parts[4] if len(parts) > 4 else None), parts[5:]
                if method == "GET" and action is None:
                    return self._info(repo, "main")
                if method == "GET" and action == "revision" and rest:
                    return self._info(repo, "/".join(rest))
                if method == "GET" and action == "refs":
                    return self._refs(repo)
                if method == "GET" and action == "tree" and rest:
                    return self._tree(repo, rest[0], "/".join(rest[1:]), query.get("recursive") == ["true"])
                if method == "POST" and action in ("preupload", "commit", "branch") and rest:
                    self._require_token(headers)
                    target = "/".join(rest)
                    if action == "preupload":
                        return self._preupload(repo, target, json.loads(body))
                    if action == "commit":
                        if query.get("create_pr"):
                            raise HubError(400, "FakeHub does not implement pull requests")
                        return self._commit(repo, target, body)
                    return self._create_branch(repo, target, json.loads(body or b"{}"))
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(self._repo(f"{parts[0]}/{parts[1]}"), parts[3], "/".join(parts[4:]))
        raise HubError(404, f"FakeHub does not implement {method} {path}")

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    @staticmethod
    def _require_token(headers) -> None:
        if not (headers.get("Authorization") or "").startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _create_repo(self, headers, payload: dict):
        self._require_token(headers)
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "FakeHub only hosts model repositories")
        repo_id = f"{payload.get('organization') or 'fake-user'}/{payload['name']}"
        if repo_id in self.repos:
            # like the Hub, the conflict still names the repo: `create_repo(exist_ok=True)` reads its url
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        repo = self.repos[repo_id] = Repo(
            repo_id, private=payload.get("visibility") == "private" or payload.get("private") is True
        )
        attributes = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        repo.add_commit("main", None, "initial commit", "", attributes, list(attributes))
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex}, {}

    def _validate_yaml(self, payload: dict):
        match = _YAML_BLOCK.search(payload.get("content", ""))
        errors = []
        try:
            metadata = yaml.safe_load(match.group(2)) if match else {}
            if not isinstance(metadata, dict):
                errors.append({"message": "the metadata block must be a mapping"})
        except yaml.YAMLError as error:
            errors.append({"message": f"invalid YAML: {error}"})
        return (400 if errors else 200), {"errors": errors, "warnings": []}, {}

    def _info(self, repo: Repo, revision: str):
        commit = self._commit_at(repo, revision)
        siblings = [{"rfilename": path, "size": len(data)} for path, data in sorted(commit.files.items())]
        return 200, {"id": repo.repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings}, {}

    def _refs(self, repo: Repo):
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
        return 200, {"branches": branches, "tags": [], "converts": []}, {}

    def _tree(self, repo: Repo, revision: str, folder: str, recursive: bool):
        files = self._commit_at(repo, revision).files
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries = {}
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way to the file
                name = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries[name] = {"type": "directory", "path": name, "oid": git_blob_sha(name.encode()), "size": 0}
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "oid": git_blob_sha(data), "size": len(data)}
        return 200, list(entries.values()), {}

    def _preupload(self, repo: Repo, revision: str, payload: dict):
        existing = self._commit_at(repo, revision).files
        files = [
            {
                "path": item["path"],
                "uploadMode": "regular",  # never LFS: contents come base64-inline in the commit
                "shouldIgnore": False,
                "oid": git_blob_sha(existing[item["path"]]) if item["path"] in existing else None,
            }
            for item in payload["files"]
        ]
        return 200, {"files": files, "commitOid": self._commit_at(repo, revision).oid}, {}

    def _commit(self, repo: Repo, branch: str, body: bytes):
        parent = self._commit_at(repo, branch)
        if self.fail_commits:
            raise HubError(500, "Internal Error (injected by FakeHub): the commit was not applied")
        if branch not in repo.branches:
            raise HubError(400, f"Cannot commit to {branch}: not a branch")
        files, header, changed = dict(parent.files), None, []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key != "header":
                changed.append(value["path"])
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:  # lfsFile: never requested, since preupload answers "regular" for every file
                raise HubError(400, f"FakeHub does not accept {key!r} operations")
        if header is None:
            raise HubError(400, "the commit payload has no header")
        if header.get("parentCommit") and header["parentCommit"] != parent.oid:
            raise HubError(412, "The parent commit is not the head of the branch")
        commit = repo.add_commit(branch, parent, header["summary"], header.get("description", ""), files, changed)
        url = f"{self.url}/{repo.repo_id}/commit/{commit.oid}"
        return 200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None}, {}

    def _create_branch(self, repo: Repo, branch: str, payload: dict):
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        start = self._commit_at(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        return 200, {}, {}

    def _resolve(self, repo: Repo, revision: str, path: str):
        commit = self._commit_at(repo, revision)
        if path not in commit.files:
            raise HubError(404, f"Entry {path} not found", "EntryNotFound")
        data = commit.files[path]
        return 200, data, {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha(data)}"'}


@contextmanager
def online_hub(monkeypatch, **kwargs) -> Iterator[FakeHub]:
    """A running `FakeHub` with the Hub client pointed at it, online and with a token; stopped on exit."""
    with FakeHub(**kwargs) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once, when huggingface_hub is imported
        monkeypatch.setenv("HF_TOKEN", "dummy")
        yield hub


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub

    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.fake_hub.fault(split.path) == STALL:
            self.fake_hub.stall(method, split.path)
            self.close_connection = True
            return
        try:
            status, payload, headers = self.fake_hub.handle(
                method, split.path, parse_qs(split.query), self.headers, body
            )
        except HubError as error:
            status, payload = error.status, {"error": error.message, **error.extra}
            headers = {"X-Error-Message": error.message}
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
        except Exception as error:  # a bug in the fake: answer 500 with the cause rather than drop the connection
            status, payload, headers = 500, {"error": f"FakeHub crashed: {error!r}"}, {}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        headers.setdefault(
            "Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json"
        )
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._serve("GET")

    def do_HEAD(self):  # noqa: N802
        self._serve("HEAD")

    def do_POST(self):  # noqa: N802
        self._serve("POST")

    def log_message(self, format, *args):  # keep test output clean
        pass
