"""A local stand-in for the Hugging Face Hub: the endpoints huggingface_hub 2.x calls to push.

Written from what the client sends (``huggingface_hub/hf_api.py``, ``_commit_api.py``,
``lfs.py``): ``GET /api/whoami-v2``, ``POST /api/repos/create``, ``GET /api/models/{repo}[/revision/
{rev}]``, ``POST /api/models/{repo}/branch/{branch}``, ``POST /api/validate-yaml``,
``POST /api/models/{repo}/preupload/{rev}``, ``POST /{repo}.git/info/lfs/objects/batch`` with
basic (one PUT) and multipart (PUT per part + completion) transfers and the verify step,
``POST /api/models/{repo}/commit/{rev}`` (NDJSON, ``create_pr=1`` opens ``refs/pr/N``) and
``HEAD/GET /{repo}/resolve/{rev}/{path}``. Tokens are checked on every call (401 unknown,
403 read-only or foreign namespace). What arrives is kept in memory for the tests to compare.

It listens on 127.0.0.1 only, on an ephemeral port, in a daemon thread, and shuts itself down
after ``lifetime`` seconds even if a test forgets to; request bodies are capped. Xet is not
spoken: run the client with ``HF_HUB_DISABLE_XET=1``.

    with FakeHub({"hf_good": Account("alice")}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        ...
        hub.file("alice/tiny", "model.safetensors")
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_PATTERNS = ("*.safetensors", "*.gguf", "*.bin", "*.pt")  # the Hub's default .gitattributes
_FRONT_MATTER = re.compile(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(\r?\n|$)")


@dataclass(frozen=True)
class Account:
    name: str
    orgs: tuple[str, ...] = ()
    role: str = "write"  # "read" tokens may not create, upload or commit


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What preupload reports: sha256 for LFS files, git blob sha1 for regular ones."""
        if self.lfs:
            return hashlib.sha256(self.data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, StoredFile]
    summary: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: int = 0

    def resolve(self, revision: str) -> Commit | None:
        oid = self.refs.get(revision, revision)
        return self.commits.get(oid)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None


class HubError(Exception):
    """Raised inside a handler: becomes an HTTP error answer."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    def __init__(self, tokens: dict[str, Account], *, lfs_threshold: int = 10 << 20,
                 multipart_threshold: int | None = None, chunk_size: int = 1 << 20,
                 lifetime: float = 120.0, max_body: int = 256 << 20):
        self.tokens = tokens
        self.lfs_threshold = lfs_threshold
        self.multipart_threshold = multipart_threshold
        self.chunk_size = chunk_size
        self.max_body = max_body
        self.lifetime = lifetime
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[RecordedRequest] = []
        self._uploads: dict[str, dict[str, Any]] = {}  # upload id -> oid, size, parts
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # a short poll interval: shutdown() waits for it, once per test
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                         name="fake-hub", daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- what tests look at ------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None,
                 private: bool = False) -> Repo:
        """A repo with one commit on ``main`` (like the Hub's initial ``.gitattributes``)."""
        repo = Repo(repo_id, private)
        files = {".gitattributes": b"*.safetensors filter=lfs\n", **(files or {})}
        self._commit(repo, "main", {p: self._stored(p, d) for p, d in files.items()},
                     "initial commit", parent=None)
        self.repos[repo_id] = repo
        return repo

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"no revision {revision} in {repo_id}"
        return commit.files[path].data

    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"no revision {revision} in {repo_id}"
        return dict(commit.files)

    def calls(self, method: str, pattern: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    # -- state changes -----------------------------------------------------------------------
    def _stored(self, path: str, data: bytes) -> StoredFile:
        return StoredFile(data, self._is_lfs(path, len(data), data[:512]))

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        name = path.rsplit("/", 1)[-1]
        return (any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS) or size >= self.lfs_threshold
                or b"\0" in sample)

    def _commit(self, repo: Repo, ref: str, files: dict[str, StoredFile], summary: str,
                parent: str | None) -> Commit:
        digest = hashlib.sha1(f"{parent}\0{summary}\0{len(repo.commits)}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].oid}".encode())
        commit = Commit(digest.hexdigest(), parent, files, summary)
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit


def _repo_path(parts: list[str]) -> str:
    return "/".join(parts[:2])


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass  # quiet: the tests read hub.requests instead

    # -- plumbing ----------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > self.hub.max_body:
                    raise HubError(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body:
            raise HubError(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _handle(self) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.parts = [unquote(p) for p in split.path.strip("/").split("/")]
        auth = self.headers.get("Authorization")
        with self.hub._lock:
            self.hub.requests.append(RecordedRequest(self.command, split.path, self.query, auth))
        try:
            self.body = self._read_body()
            self._route()
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json({"error": err.message}, err.status, headers)
        except Exception as exc:  # a bug in the fake: answer with a status the client won't retry
            self._json({"error": f"fake hub bug: {exc!r}"}, 418)

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    def _route(self) -> None:
        p, m = self.parts, self.command
        if p[:2] == ["api", "whoami-v2"] and m == "GET":
            return self._whoami()
        if p[:3] == ["api", "repos", "create"] and m == "POST":
            return self._create_repo()
        if p[:2] == ["api", "validate-yaml"] and m == "POST":
            return self._validate_yaml()
        if p[:2] == ["api", "models"] and len(p) >= 4:
            repo_id, rest = _repo_path(p[2:]), p[4:]
            if not rest and m == "GET":
                return self._repo_info(repo_id, "main")
            if rest[:1] == ["revision"] and m == "GET":
                return self._repo_info(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["branch"] and m == "POST":
                return self._create_branch(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["preupload"] and m == "POST":
                return self._preupload(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["commit"] and m == "POST":
                return self._commit(repo_id, "/".join(rest[1:]))
        if p[:1] == ["_storage"] and m == "PUT":
            return self._storage_put(p[1], int(p[3]) if len(p) > 3 else None)
        if p[:1] == ["_storage"] and m == "POST" and p[2:] == ["complete"]:
            return self._storage_complete(p[1])
        if p[:1] == ["_storage"] and m == "POST" and p[2:] == ["verify"]:
            return self._storage_verify(p[1])
        if len(p) >= 5 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{p[0]}/{p[1][:-4]}")
        if len(p) >= 5 and p[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve(_repo_path(p), p[3], "/".join(p[4:]))
        raise HubError(404, f"fake hub: no route for {m} /{'/'.join(p)}")

    # -- auth --------------------------------------------------------------------------------
    def _account(self, required: bool = True, write: bool = False) -> Account | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            if required:
                raise HubError(401, "Invalid username or password.")
            return None
        token = auth.removeprefix("Bearer ").strip()
        account = self.hub.tokens.get(token)
        if account is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if write and account.role == "read":
            raise HubError(403, "This token is read-only")
        return account

    def _repo(self, repo_id: str, account: Account | None) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not _owns(account, repo_id)):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str) -> Repo:
        account = self._account(write=True)
        repo = self._repo(repo_id, account)
        if not _owns(account, repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- endpoints ---------------------------------------------------------------------------
    def _whoami(self) -> None:
        account = self._account()
        assert account is not None
        self._json({"type": "user", "name": account.name, "fullname": account.name,
                    "orgs": [{"name": o, "type": "org"} for o in account.orgs],
                    "auth": {"type": "access_token",
                             "accessToken": {"displayName": "test", "role": account.role}}})

    def _create_repo(self) -> None:
        account = self._account(write=True)
        payload = json.loads(self.body)
        repo_id = f"{payload.get('organization') or account.name}/{payload['name']}"
        if not _owns(account, repo_id):
            raise HubError(403, f"You don't have the rights to create a model under the "
                                f"namespace \"{repo_id.split('/')[0]}\"")
        with self.hub._lock:
            if repo_id in self.hub.repos:
                return self._json({"error": "You already created this model repo",
                                   "url": f"{self.hub.url}/{repo_id}"}, 409)
            self.hub.add_repo(repo_id, private=payload.get("visibility") == "private")
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex})

    def _repo_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, self._account(required=False))
        commit = self._commit_at(repo, revision)
        self._json({"id": repo_id, "_id": repo_id, "sha": commit.oid, "private": repo.private,
                    "siblings": [{"rfilename": path} for path in sorted(commit.files)]})

    def _create_branch(self, repo_id: str, branch: str) -> None:
        repo = self._writable(repo_id)
        start = json.loads(self.body or b"{}").get("startingPoint", "main")
        with self.hub._lock:
            if branch in repo.refs:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.refs[branch] = self._commit_at(repo, start).oid
        self._json({})

    def _validate_yaml(self) -> None:
        self._account(required=False)
        content = json.loads(self.body)["content"]
        match = _FRONT_MATTER.match(content)
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            return self._json({"errors": [{"message": f"Invalid YAML: {exc}"}]}, 400)
        if data is not None and not isinstance(data, dict):
            return self._json({"errors": [{"message": "metadata must be a mapping"}]}, 400)
        self._json({"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, revision: str) -> None:
        repo = self._writable(repo_id)
        commit = self._commit_at(repo, revision)
        answers = []
        for f in json.loads(self.body)["files"]:
            lfs = self.hub._is_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
            remote = commit.files.get(f["path"])
            answers.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False,
                            "oid": remote.oid if remote is not None and remote.lfs == lfs else None})
        self._json({"files": answers})

    def _lfs_batch(self, repo_id: str) -> None:
        self._writable(repo_id)
        payload = json.loads(self.body)
        if payload.get("operation") != "upload" or payload.get("hash_algo") != "sha256":
            raise HubError(400, "only sha256 uploads are supported")
        objects, multipart = [], False
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            if oid in self.hub.lfs:  # already stored: no actions, the client skips it
                objects.append({"oid": oid, "size": size})
                continue
            upload_id = uuid.uuid4().hex
            base = f"{self.hub.url}/_storage/{upload_id}"
            with self.hub._lock:
                self.hub._uploads[upload_id] = {"oid": oid, "size": size, "parts": {}}
            threshold = self.hub.multipart_threshold
            if threshold is not None and size >= threshold and "multipart" in payload["transfers"]:
                multipart = True
                n_parts = -(-size // self.hub.chunk_size)
                header = {"chunk_size": str(self.hub.chunk_size)}
                header.update({str(i): f"{base}/part/{i}" for i in range(1, n_parts + 1)})
                upload = {"href": f"{base}/complete", "header": header}
            else:
                upload = {"href": base}
            objects.append({"oid": oid, "size": size, "authenticated": True,
                            "actions": {"upload": upload, "verify": {"href": f"{base}/verify"}}})
        self._json({"transfer": "multipart" if multipart else "basic", "objects": objects},
                   headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _storage_put(self, upload_id: str, part: int | None) -> None:
        # storage URLs are pre-signed (no token), like the S3 URLs the Hub hands out
        upload = self.hub._uploads.get(upload_id)
        if upload is None:
            raise HubError(403, "unknown or expired upload URL")
        if part is None:
            self._store(upload, self.body)
            return self._send(200)
        upload["parts"][part] = self.body
        self._send(200, headers={"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})

    def _storage_complete(self, upload_id: str) -> None:
        upload = self.hub._uploads.get(upload_id)
        if upload is None:
            raise HubError(403, "unknown or expired upload URL")
        payload = json.loads(self.body)
        parts = sorted(payload["parts"], key=lambda p: p["partNumber"])
        for p in parts:
            data = upload["parts"].get(p["partNumber"])
            if data is None or p["etag"].strip('"') != hashlib.md5(data).hexdigest():
                raise HubError(400, f"part {p['partNumber']}: missing or wrong etag")
        self._store(upload, b"".join(upload["parts"][p["partNumber"]] for p in parts))
        self._json({})

    def _store(self, upload: dict[str, Any], data: bytes) -> None:
        if len(data) != upload["size"] or hashlib.sha256(data).hexdigest() != upload["oid"]:
            raise HubError(400, "uploaded content does not match its oid and size")
        with self.hub._lock:
            self.hub.lfs[upload["oid"]] = data

    def _storage_verify(self, upload_id: str) -> None:
        self._account()
        payload = json.loads(self.body)
        if payload["oid"] not in self.hub.lfs:
            raise HubError(404, "object not uploaded")
        self._json({})

    def _commit(self, repo_id: str, revision: str) -> None:
        repo = self._writable(repo_id)
        if self.headers.get("Content-Type") != "application/x-ndjson":
            raise HubError(400, "commit payload must be application/x-ndjson")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "first NDJSON line must be the header")
        summary = lines[0]["value"]["summary"]
        with self.hub._lock:
            base = self._commit_at(repo, revision)
            files = dict(base.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    data = self.hub.lfs.get(value["oid"])
                    if data is None:
                        raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = StoredFile(data, True)
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                else:
                    raise HubError(400, f"fake hub: unsupported operation {key}")
            pr_url = None
            if self.query.get("create_pr") == ["1"]:
                repo.prs += 1
                ref = f"refs/pr/{repo.prs}"
                pr_url = f"{self.hub.url}/{repo_id}/discussions/{repo.prs}"
            else:
                ref = repo.refs.get(revision) and revision
                if ref is None:
                    raise HubError(400, f"cannot commit on {revision}: not a branch")
            commit = self.hub._commit(repo, ref, files, summary, parent=base.oid)
        answer = {"success": True, "commitOid": commit.oid,
                  "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.oid}"}
        if pr_url:
            answer["pullRequestUrl"] = pr_url
        self._json(answer)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id, self._account(required=False))
        commit = self._commit_at(repo, revision)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{stored.oid}"'}
        self._send(200, stored.data, headers, content_type="application/octet-stream")


def _owns(account: Account | None, repo_id: str) -> bool:
    return account is not None and repo_id.split("/")[0] in (account.name, *account.orgs)
