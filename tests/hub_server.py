"""A small in-memory server that answers the Hugging Face Hub requests huggingface_hub 2.x makes to publish and
download a model repository (standard library only).

Two origins on 127.0.0.1, like the Hub and its object storage: the Hub API (repositories, commits, LFS batch,
downloads) and a storage origin that takes LFS uploads at one-time URLs and serves LFS objects at signed URLs.
Xet is never advertised. Tests can make a route fail (`fail`), take a request's body and never answer (`stall`),
hold LFS uploads to interrupt a client (`hold_lfs_uploads`) and count the bytes each route received
(`bytes_received`). `SilentServer` accepts connections and never answers at all.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".model", ".msgpack", ".h5", ".onnx", ".npz")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
HOLD_TIMEOUT_S = 60


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class RepoEntry:
    """A file at a commit: its bytes in git, or a pointer to an LFS object."""

    content: bytes | None = None
    lfs_sha256: str | None = None
    lfs_size: int = 0

    @property
    def git_bytes(self) -> bytes:
        return self.content if self.lfs_sha256 is None else lfs_pointer(self.lfs_sha256, self.lfs_size)

    @property
    def size(self) -> int:
        return len(self.content) if self.lfs_sha256 is None else self.lfs_size

    @property
    def oid(self) -> str:
        return git_blob_oid(self.git_bytes)

    def tree_json(self, path: str) -> dict:
        item = {"type": "file", "path": path, "oid": self.oid, "size": self.size}
        if self.lfs_sha256 is not None:
            item["lfs"] = {"oid": self.lfs_sha256, "size": self.lfs_size, "pointerSize": len(self.git_bytes)}
        return item


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, RepoEntry]
    operations: list[tuple[str, str]]  # (ndjson key, path) as received


@dataclass
class Repository:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    """An error answer: status, message, and the X-Error-Code huggingface_hub maps to its exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **fields):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.fields = fields  # more keys of the JSON answer


class DroppedConnection(Exception):
    """Close the socket without answering."""


class Stalled(Exception):
    """Read the request's body, then answer nothing until the server stops."""


class HubServer:
    """Start with `with HubServer(tokens={"hf_token": "alice"}) as server:`; `server.endpoint` is the Hub URL."""

    def __init__(self, tokens: dict[str, str], organizations: dict[str, set[str]] | None = None):
        self.tokens = dict(tokens)  # token -> user name
        self.organizations = organizations or {}  # organization -> member user names
        self.repos: dict[str, Repository] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.lfs_uploads: dict[str, int] = {}  # sha256 -> completed uploads
        # [method, path, status], recorded before the answer goes out; the status is set once it is known
        self.requests: list[list] = []
        self._bytes_received: dict[str, int] = {}
        self._failures: dict[str, int | str] = {}
        self._tickets: dict[str, tuple[str, int]] = {}  # one-time upload ticket -> (sha256, size)
        self._secret = secrets.token_bytes(16)
        self._commit_counter = 0
        self._upload_quota: int | None = None
        self._held_uploads = 0
        self._release = threading.Event()
        self._stopped = threading.Event()
        self._changed = threading.Condition()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    # lifecycle

    def __enter__(self) -> "HubServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        for handler in (_HubHandler, _StorageHandler):
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            server.hub = self
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.storage_endpoint = f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def stop(self) -> None:
        self._stopped.set()
        self._release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)

    # controls for tests

    def fail(self, route: str, status: int | None = None, *, drop: bool = False) -> None:
        """Answer every request to `route` with `status`, or close the connection unanswered (`drop=True`)."""
        self._failures[route] = "drop" if drop else status

    def stall(self, route: str) -> None:
        """Take the whole body of every request to `route` and never answer (until the server stops)."""
        self._failures[route] = "stall"

    def clear_failures(self) -> None:
        self._failures.clear()

    def hold_lfs_uploads(self, admitted: int) -> None:
        """Store only the next `admitted` LFS uploads; hold later ones unanswered until `release_held_uploads`."""
        self._upload_quota = admitted
        self._release.clear()

    def release_held_uploads(self) -> None:
        self._upload_quota = None
        self._release.set()

    def wait_until(self, predicate, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout=timeout)

    @property
    def held_uploads(self) -> int:
        return self._held_uploads

    def bytes_received(self, route: str | None = None) -> int:
        """Request-body bytes received so far, on one route or in total."""
        if route is None:
            return sum(self._bytes_received.values())
        return self._bytes_received.get(route, 0)

    def head(self, repo_id: str, branch: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[branch]]

    def file_bytes(self, repo_id: str, path: str, branch: str = "main") -> bytes:
        entry = self.head(repo_id, branch).files[path]
        return entry.content if entry.lfs_sha256 is None else self.lfs_objects[entry.lfs_sha256]

    # shared state, called from handler threads

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _count(self, route: str, size: int) -> None:
        with self._changed:
            self._bytes_received[route] = self._bytes_received.get(route, 0) + size

    def _injected(self, route: str) -> None:
        failure = self._failures.get(route)
        if failure == "drop":
            raise DroppedConnection
        if failure == "stall":
            raise Stalled
        if failure is not None:
            raise HubError(failure, f"Injected failure on {route}")

    def _new_commit(self, repo: Repository, parent: Commit | None, message: str, files, operations) -> Commit:
        self._commit_counter += 1
        seed = f"{repo.repo_id}\n{parent.oid if parent else ''}\n{message}\n{self._commit_counter}\n{sorted(files)}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), message, files, operations)
        repo.commits[commit.oid] = commit
        return commit

    def _sign(self, sha256: str) -> str:
        return hmac.new(self._secret, sha256.encode(), hashlib.sha256).hexdigest()

    def _user(self, authorization: str | None, *, required: bool) -> str | None:
        if authorization is None:
            if required:
                raise HubError(401, "You must be authenticated to access this resource.")
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _can_write(self, user: str, namespace: str) -> bool:
        return namespace == user or user in self.organizations.get(namespace, set())

    def _repo(self, repo_id: str, user: str | None, *, write: bool) -> Repository:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or not self._can_write(user, repo_id.split("/")[0]))):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if write and not self._can_write(user, repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_at(self, repo: Repository, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit


class _Handler(BaseHTTPRequestHandler):
    """Routing, body reading and answers shared by both origins."""

    protocol_version = "HTTP/1.0"
    routes: list[tuple[str, re.Pattern, str]] = []  # (method, path pattern, route name)

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def log_message(self, format, *args) -> None:
        return

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.route = None
        self.body_read = False
        status = 404
        record = [self.command, url.path, status]
        self.hub.requests.append(record)
        try:
            for method, pattern, route in self.routes:
                match = pattern.fullmatch(url.path)
                if match and self.command in method.split("|"):
                    self.route = route
                    self.hub._injected(route)
                    status = getattr(self, route)(**match.groupdict())
                    break
            else:
                raise HubError(404, f"No route for {self.command} {url.path}")
        except HubError as err:
            self._drain()  # an unread body would make closing the socket reset the connection under the answer
            status = err.status
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send_json({"error": err.message, **err.fields}, status, headers)
        except Stalled:
            self._drain()
            self.hub._notify()
            self.hub._stopped.wait(timeout=HOLD_TIMEOUT_S)
            status = 0
            self.close_connection = True
        except DroppedConnection:
            status = 0
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # the client is already gone
                pass
        except (ConnectionError, TimeoutError):
            status = 0
            self.close_connection = True
        record[2] = status
        self.hub._notify()

    def _drain(self) -> None:
        if not self.body_read:
            try:
                self._body()
            except (ConnectionError, ValueError):
                pass

    def _body(self) -> bytes:
        self.body_read = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            body = b"".join(chunks)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if len(body) != length:
                raise ConnectionError(f"request body cut short: {len(body)} of {length} bytes")
        self.hub._count(self.route or "unrouted", len(body))
        return body

    def _json_body(self):
        try:
            return json.loads(self._body() or b"null")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str | None = None):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, str(value))
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _send_json(self, payload, status: int = 200, headers: dict | None = None):
        return self._send(status, json.dumps(payload).encode(), headers, "application/json")


def _routes(*table: tuple[str, str, str]) -> list[tuple[str, re.Pattern, str]]:
    return [(method, re.compile(pattern), route) for method, pattern, route in table]


class _HubHandler(_Handler):
    routes = _routes(
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{REPO}(?:/revision/(?P<revision>[^/]+))?", "repo_info"),
        ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", "commit"),
        ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", rf"/api/models/{REPO}/paths-info/(?P<revision>[^/]+)", "paths_info"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
        ("GET|HEAD", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
    )

    def _caller(self, *, required: bool) -> str | None:
        return self.hub._user(self.headers.get("Authorization"), required=required)

    def whoami(self):
        user = self._caller(required=True)
        orgs = [{"name": org, "type": "org"} for org, members in self.hub.organizations.items() if user in members]
        return self._send_json({"type": "user", "name": user, "orgs": orgs, "auth": {"type": "access_token"}})

    def create_repo(self):
        user = self._caller(required=True)
        payload = self._json_body()
        if payload.get("type", "model") != "model":
            raise HubError(400, "This server only hosts model repositories")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if not re.fullmatch(REPO, repo_id):
            raise HubError(400, f"Invalid repository name {repo_id!r}")
        if not self.hub._can_write(user, namespace):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        url = f"{self.hub.endpoint}/{repo_id}"
        with self.hub._changed:
            if repo_id in self.hub.repos:
                raise HubError(409, "You already created this model repo", url=url)
            repo = Repository(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            attributes = {".gitattributes": RepoEntry(GITATTRIBUTES)}
            initial = self.hub._new_commit(repo, None, "initial commit", attributes, [])
            repo.branches["main"] = initial.oid
            self.hub.repos[repo_id] = repo
        return self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self):
        user = self._caller(required=True)
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        self.hub._repo(repo_id, user, write=True)
        with self.hub._changed:
            del self.hub.repos[repo_id]
        return self._send_json({})

    def validate_yaml(self):
        self._caller(required=False)
        self._json_body()
        return self._send_json({"errors": [], "warnings": []})

    def repo_info(self, repo, revision=None):
        user = self._caller(required=False)
        repository = self.hub._repo(repo, user, write=False)
        commit = self.hub._commit_at(repository, revision or "main")
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return self._send_json(
            {"id": repo, "author": repo.split("/")[0], "sha": commit.oid, "private": repository.private,
             "siblings": siblings, "tags": []}
        )

    def create_branch(self, repo, branch):
        user = self._caller(required=True)
        repository = self.hub._repo(repo, user, write=True)
        payload = self._json_body() or {}
        start = self.hub._commit_at(repository, payload.get("startingPoint", "main"))
        with self.hub._changed:
            if unquote(branch) in repository.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{unquote(branch)}")
            repository.branches[unquote(branch)] = start.oid
        return self._send_json({})

    def preupload(self, repo, revision):
        user = self._caller(required=True)
        repository = self.hub._repo(repo, user, write=True)
        files = self.hub._commit_at(repository, revision).files
        answers = []
        for item in self._json_body()["files"]:
            path, size = item["path"], item["size"]
            lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
            existing = files.get(path)
            remote_oid = None if existing is None else (existing.lfs_sha256 or existing.oid)
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": remote_oid})
        return self._send_json({"files": answers})

    def lfs_batch(self, repo):
        user = self._caller(required=True)
        self.hub._repo(repo, user, write=True)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        objects = []
        for item in payload["objects"]:
            oid, size = item["oid"], item["size"]
            answer = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_objects:  # objects already stored get no actions: the client skips them
                ticket = secrets.token_hex(16)
                self.hub._tickets[ticket] = (oid, size)
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.storage_endpoint}/upload/{oid}?ticket={ticket}"},
                    "verify": {"href": f"{self.hub.endpoint}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(answer)
        return self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_verify(self, repo):
        user = self._caller(required=True)
        self.hub._repo(repo, user, write=True)
        payload = self._json_body()
        content = self.hub.lfs_objects.get(payload["oid"])
        if content is None or len(content) != payload["size"]:
            raise HubError(404, f"LFS object {payload['oid']} of size {payload['size']} not found")
        return self._send_json({})

    def commit(self, repo, revision):
        user = self._caller(required=True)
        repository = self.hub._repo(repo, user, write=True)
        items = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not items or items[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = items[0]["value"]
        branch = unquote(revision)
        with self.hub._changed:
            if branch not in repository.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            parent = repository.commits[repository.branches[branch]]
            if header.get("parentCommit") not in (None, parent.oid):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            operations = []
            for item in items[1:]:
                key, value = item["key"], item["value"]
                operations.append((key, value["path"]))
                if key == "file":
                    files[value["path"]] = RepoEntry(content=base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    stored = self.hub.lfs_objects.get(value["oid"])
                    if stored is None or ("size" in value and len(stored) != value["size"]):
                        raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    files[value["path"]] = RepoEntry(lfs_sha256=value["oid"], lfs_size=len(stored))
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {path: entry for path, entry in files.items() if not path.startswith(prefix)}
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            commit = self.hub._new_commit(repository, parent, header["summary"], files, operations)
            repository.branches[branch] = commit.oid
        return self._send_json(
            {"commitUrl": f"{self.hub.endpoint}/{repo}/commit/{commit.oid}", "commitOid": commit.oid,
             "pullRequestUrl": None, "success": True}
        )

    def _tree_items(self, files: dict[str, RepoEntry], prefix: str, recursive: bool) -> list[dict]:
        items, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                items.append(files[path].tree_json(path))
        items += [{"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest()}
                  for folder in sorted(folders)]
        return items

    @staticmethod
    def _ancestors(path: str) -> list[str]:
        parts = path.split("/")
        return ["/".join(parts[:depth]) for depth in range(1, len(parts))]

    def tree(self, repo, revision, path=None):
        user = self._caller(required=False)
        commit = self.hub._commit_at(self.hub._repo(repo, user, write=False), revision)
        prefix = f"{unquote(path).strip('/')}/" if path else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        return self._send_json(self._tree_items(commit.files, prefix, recursive))

    def paths_info(self, repo, revision):
        user = self._caller(required=False)
        commit = self.hub._commit_at(self.hub._repo(repo, user, write=False), revision)
        paths = parse_qs(self._body().decode()).get("paths", [])
        folders = {folder for path in commit.files for folder in self._ancestors(path)}
        items = [commit.files[path].tree_json(path) for path in paths if path in commit.files]
        items += [{"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}
                  for path in paths if path in folders]
        return self._send_json(items)

    def resolve(self, repo, revision, path):
        user = self._caller(required=False)
        commit = self.hub._commit_at(self.hub._repo(repo, user, write=False), revision)
        path = unquote(path)
        entry = commit.files.get(path)
        headers = {"X-Repo-Commit": commit.oid}
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        headers["ETag"] = f'"{entry.oid}"'
        if entry.lfs_sha256 is None:
            return self._send(200, entry.content, headers, "application/octet-stream")
        sha256 = entry.lfs_sha256
        location = f"{self.hub.storage_endpoint}/objects/{sha256}?signature={self.hub._sign(sha256)}"
        headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": entry.lfs_size, "Location": location})
        return self._send(302, b"", headers)


class _StorageHandler(_Handler):
    routes = _routes(
        ("PUT", r"/upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
        ("GET|HEAD", r"/objects/(?P<oid>[0-9a-f]{64})", "lfs_download"),
    )

    def lfs_upload(self, oid):
        ticket = self.query.get("ticket", [""])[0]
        if self.hub._tickets.get(ticket, (None,))[0] != oid:
            raise HubError(403, "Upload URL is not valid for this object")
        with self.hub._changed:
            held = self.hub._upload_quota is not None and self.hub._upload_quota <= 0
            if self.hub._upload_quota is not None and not held:
                self.hub._upload_quota -= 1
            self.hub._held_uploads += held
            self.hub._changed.notify_all()
        if held:
            self.hub._release.wait(timeout=HOLD_TIMEOUT_S)
            raise DroppedConnection
        content = self._body()
        expected_size = self.hub._tickets[ticket][1]
        if len(content) != expected_size or hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match object {oid} of size {expected_size}")
        with self.hub._changed:
            self.hub._tickets.pop(ticket, None)
            self.hub.lfs_objects[oid] = content
            self.hub.lfs_uploads[oid] = self.hub.lfs_uploads.get(oid, 0) + 1
        return self._send(200, b"", {"ETag": f'"{oid}"'})

    def lfs_download(self, oid):
        signature = self.query.get("signature", [""])[0]
        if not hmac.compare_digest(signature, self.hub._sign(oid)) or oid not in self.hub.lfs_objects:
            raise HubError(403, "Signature does not match the object")
        content = self.hub.lfs_objects[oid]
        return self._send(200, content, {"ETag": f'"{oid}"'}, "application/octet-stream")


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers; `endpoint` is its URL."""

    def __init__(self):
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.05)
        self._connections: list[socket.socket] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self.endpoint = f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def __enter__(self) -> "SilentServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        self._thread.join(timeout=10)
        self._socket.close()
        for connection in self._connections:
            connection.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                self._connections.append(self._socket.accept()[0])
            except TimeoutError:
                continue


def hub_environment(endpoint: str, home, token: str | None) -> dict[str, str]:
    """Environment for a subprocess whose huggingface_hub talks to `endpoint` only (read at import)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    env.pop("TRANSFORMERS_OFFLINE", None)
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        NO_PROXY="127.0.0.1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def point_huggingface_hub_at(monkeypatch, endpoint: str, home) -> None:
    """In this process, send huggingface_hub (and transformers through it) to `endpoint`, caching under `home`."""
    from huggingface_hub import constants
    from transformers.utils import hub as transformers_hub

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    settings = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)  # rebuilt on first use with the endpoint above
