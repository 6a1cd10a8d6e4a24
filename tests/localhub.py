"""A Hugging Face Hub on 127.0.0.1, for tests that must not reach the network.

It serves, over model repos held in memory, the HTTP calls huggingface_hub 2.4 makes:

- reading (snapshot_download, hf_hub_download, from_pretrained): revision info, the file tree, refs,
  HEAD and GET of ``/<repo>/resolve/<rev>/<path>`` with Range;
- writing (create_repo, list_repo_refs, create_commit, create_tag): ``POST /api/repos/create``,
  ``POST /api/validate-yaml`` (the README front matter, before a commit), ``POST .../preupload/<rev>``
  (regular or LFS per file), the LFS batch API ``POST /<repo>.git/info/lfs/objects/batch`` answered with a
  basic-transfer upload URL here (``PUT /lfs/<oid>``, checked against its sha256, then ``verify``), the ndjson
  ``POST .../commit/<rev>`` (a new commit on the branch, LFS entries only for uploaded objects) and
  ``POST .../tag/<rev>`` (409 when the tag exists).

Xet uploads are not served: a test that commits sets ``huggingface_hub.constants.HF_HUB_DISABLE_XET`` (or
``HF_HUB_DISABLE_XET=1``), and the client falls back to LFS as it does for a Hub without Xet. Writes need
``Authorization: Bearer <token>`` (the token given, or any when none is); a private repo answers 401 to
reads without it, as the Hub does. Every path requested and every Authorization header are recorded, and a
file can be throttled so a test can kill a download halfway. Point huggingface_hub at it with
``HF_ENDPOINT=hub.url`` (read when huggingface_hub is imported) or ``HfApi(endpoint=hub.url)``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".png")  # stored as LFS files, as the Hub does for weights
REGULAR_MAX_BYTES = 10 * 1000**2  # larger files go to LFS on the Hub too
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool


@dataclass
class Repo:
    private: bool = False
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)  # oid -> files at that commit
    messages: dict[str, tuple[str, str]] = field(default_factory=dict)  # oid -> (summary, description)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        rev = rev.removeprefix("refs/heads/").removeprefix("refs/tags/")
        if rev in self.commits:
            return rev
        return self.branches.get(rev) or self.tags.get(rev)


class LocalHub:
    def __init__(self, repo_id: str | None = None, folder: Path | None = None, commit: str | None = None,
                 tag: str | None = None, *, token: str | None = None):
        """Empty, or serving one repo of ``folder``'s files at ``commit`` (on main), tagged ``tag``."""
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes uploaded through the LFS API
        self.repo_id, self.commit, self.tag = repo_id, commit, tag
        if repo_id is not None:
            files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
                     if p.is_file()}
            repo = self.repos[repo_id] = Repo()
            repo.commits[commit] = {n: StoredFile(d, n.endswith(LFS_SUFFIXES)) for n, d in files.items()}
            repo.branches["main"] = commit
            if tag:
                repo.tags[tag] = commit
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.authorizations: list[str] = []
        self.throttle: dict[str, float] = {}  # file -> bytes per second
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def files(self) -> dict[str, bytes]:
        """The preloaded repo's files (the download tests' view)."""
        return {n: f.data for n, f in self.repos[self.repo_id].commits[self.commit].items()}

    def served(self, name: str) -> bool:
        return any(method == "GET" and path.endswith(f"/resolve/{self.commit}/{name}")
                   for method, path in self.requests)

    def tree(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """A repo's files at a revision (for assertions)."""
        repo = self.repos[repo_id]
        return {n: f.data for n, f in repo.commits[repo.resolve(rev)].items()}

    # --- what the Hub would answer -----------------------------------------------------------------

    @staticmethod
    def _entry(path: str, f: StoredFile) -> dict:
        entry = {"type": "file", "path": path, "size": len(f.data), "oid": git_blob_id(f.data)}
        if f.lfs:
            entry["lfs"] = {"oid": hashlib.sha256(f.data).hexdigest(), "size": len(f.data), "pointerSize": 134}
        return entry

    @staticmethod
    def _etag(f: StoredFile) -> str:
        return hashlib.sha256(f.data).hexdigest() if f.lfs else git_blob_id(f.data)

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, StoredFile], summary: str,
                    description: str) -> str:
        digest = hashlib.sha1(json.dumps([parent, summary, description, time.time_ns(),
                                          sorted((n, git_blob_id(f.data)) for n, f in files.items())]).encode())
        oid = digest.hexdigest()
        repo.commits[oid] = files
        repo.messages[oid] = (summary, description)
        return oid

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            # --- responses ---

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
                self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _error(self, status: int, code: str | None, message: str) -> None:
                headers = {"X-Error-Message": message}
                if code:
                    headers["X-Error-Code"] = code
                self._json({"error": message}, status, headers)

            def _missing(self, what: str) -> None:
                code = "EntryNotFound" if "file" in what else "RevisionNotFound"
                self._error(404, code, what)

            # --- request plumbing ---

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _authorized(self) -> bool:
                auth = self.headers.get("Authorization") or ""
                if hub.token is None:
                    return auth.startswith("Bearer ")
                return auth == f"Bearer {hub.token}"

            def _repo(self, repo_id: str, *, write: bool = False) -> Repo | None:
                """The repo, or None after answering as the Hub does (401 for a private repo without a
                token, 404 RepoNotFound for one that does not exist)."""
                repo = hub.repos.get(repo_id)
                if (write or (repo is not None and repo.private)) and not self._authorized():
                    self._error(401, "RepoNotFound", f"Repository Not Found for {repo_id}: invalid credentials")
                    return None
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository Not Found for {repo_id}")
                return repo

            def _route(self, method: str) -> None:
                url = urlsplit(self.path)
                path, query = unquote(url.path), parse_qs(url.query)
                hub.requests.append((method, path))
                if auth := self.headers.get("Authorization"):
                    hub.authorizations.append(auth)
                if method in ("POST", "PUT"):
                    body = self._body()
                    with hub._lock:  # one write at a time, as the Hub serialises commits to a branch
                        return self._dispatch(method, path, query, body)
                return self._dispatch(method, path, query, b"")  # downloads run in parallel

            def _dispatch(self, method: str, path: str, query: dict, body: bytes) -> None:
                parts = path.strip("/").split("/")
                if method == "POST" and path == "/api/repos/create":
                    return self._create_repo(json.loads(body))
                if method == "POST" and path == "/api/validate-yaml":
                    return self._json({"errors": [], "warnings": []})
                if method == "PUT" and parts[0] == "lfs" and len(parts) == 2:
                    return self._lfs_put(parts[1], body)
                if method == "POST" and parts[0] == "lfs-verify" and len(parts) == 2:
                    data = json.loads(body)
                    ok = data.get("oid") in hub.lfs_objects and len(hub.lfs_objects[data["oid"]]) == data.get("size")
                    return self._json({}) if ok else self._error(404, None, "LFS object not found")
                if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and \
                        parts[2:] == ["info", "lfs", "objects", "batch"]:
                    return self._lfs_batch(f"{parts[0]}/{parts[1].removesuffix('.git')}", json.loads(body))
                if parts[:2] == ["api", "models"] and len(parts) >= 5:
                    repo_id, action, rest = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                    return self._api(method, repo_id, action, rest, body)
                if len(parts) >= 4 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                    rev, name = parts[3], "/".join(parts[4:])
                    return self._resolve_file(f"{parts[0]}/{parts[1]}", rev, name)
                self._error(404, None, f"not a Hub route: {method} {path}")

            # --- reading ---

            def _api(self, method: str, repo_id: str, action: str, rest: str, body: bytes) -> None:
                write = method == "POST"
                repo = self._repo(repo_id, write=write)
                if repo is None:
                    return None
                if method == "GET" and action == "revision":
                    commit = repo.resolve(rest)
                    if commit is None:
                        return self._missing("revision not found")
                    return self._json({"id": repo_id, "sha": commit, "private": repo.private,
                                       "siblings": [{"rfilename": f} for f in repo.commits[commit]]})
                if method == "GET" and action == "tree":
                    rev, _, sub = rest.partition("/")
                    commit = repo.resolve(rev)
                    if commit is None:
                        return self._missing("revision not found")
                    files = repo.commits[commit]
                    return self._json([hub._entry(f, files[f]) for f in sorted(files) if f.startswith(sub)])
                if method == "GET" and action == "refs":
                    def ref(kind, name, oid):
                        return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}
                    return self._json({"branches": [ref("heads", n, o) for n, o in repo.branches.items()],
                                       "converts": [], "tags": [ref("tags", n, o) for n, o in repo.tags.items()]})
                if write and action == "preupload":
                    return self._preupload(repo, rest, json.loads(body))
                if write and action == "commit":
                    return self._commit(repo_id, repo, rest, body)
                if write and action == "tag":
                    return self._tag(repo, rest, json.loads(body))
                self._error(404, None, f"not a Hub route: {method} {action}")

            def _resolve_file(self, repo_id: str, rev: str, name: str) -> None:
                repo = self._repo(repo_id)
                if repo is None:
                    return None
                commit = repo.resolve(rev)
                if commit is None:
                    return self._missing("revision not found")
                if name not in repo.commits[commit]:
                    return self._missing("file not found")
                f = repo.commits[commit][name]
                data, start = f.data, 0
                if rng := self.headers.get("Range"):  # bytes=N- (a resumed download)
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hub._etag(f)}"')
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if self.command == "HEAD":
                    return None
                rate = hub.throttle.get(name)
                step = 64 * 1024
                for offset in range(start, len(data), step):
                    self.wfile.write(data[offset:offset + step])
                    if rate:
                        time.sleep(step / rate)
                return None

            # --- writing ---

            def _create_repo(self, payload: dict) -> None:
                if not self._authorized():
                    return self._error(401, None, "Invalid credentials in Authorization header")
                if payload.get("type", "model") != "model":
                    return self._error(400, None, "only model repos are served here")
                repo_id = f"{payload.get('organization')}/{payload['name']}"
                if repo_id in hub.repos:  # the Hub's 409 names the repo's URL, which create_repo(exist_ok) returns
                    message = "You already created this model repo"
                    return self._json({"error": message, "url": f"{hub.url}/{repo_id}"}, 409,
                                      {"X-Error-Message": message})
                private = payload.get("private", payload.get("visibility") == "private")
                repo = hub.repos[repo_id] = Repo(private=bool(private))
                first = hub._new_commit(repo, None, {".gitattributes": StoredFile(GITATTRIBUTES, False)},
                                        "initial commit", "")
                repo.branches["main"] = first
                return self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

            def _preupload(self, repo: Repo, rev: str, payload: dict) -> None:
                commit = repo.resolve(rev)
                if commit is None:
                    return self._missing("revision not found")
                current = repo.commits[commit]
                out = []
                for f in payload["files"]:
                    sample = base64.b64decode(f["sample"])
                    lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > REGULAR_MAX_BYTES or b"\0" in sample
                    old = current.get(f["path"])
                    oid = None if old is None else (hashlib.sha256(old.data).hexdigest() if old.lfs
                                                    else git_blob_id(old.data))
                    out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                                "oid": oid})
                return self._json({"files": out, "commitOid": commit})

            def _lfs_batch(self, repo_id: str, payload: dict) -> None:
                if self._repo(repo_id, write=True) is None:
                    return None
                if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
                    return self._error(400, None, "only basic LFS uploads are served here")
                objects = []
                for o in payload["objects"]:
                    entry = {"oid": o["oid"], "size": o["size"]}
                    if o["oid"] not in hub.lfs_objects:  # already stored: no action, the client skips it
                        entry["actions"] = {"upload": {"href": f"{hub.url}/lfs/{o['oid']}"},
                                            "verify": {"href": f"{hub.url}/lfs-verify/{o['oid']}"}}
                    objects.append(entry)
                return self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

            def _lfs_put(self, oid: str, body: bytes) -> None:
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._error(400, None, f"uploaded bytes do not have sha256 {oid}")
                hub.lfs_objects[oid] = body
                return self._send(200)

            def _commit(self, repo_id: str, repo: Repo, rev: str, body: bytes) -> None:
                branch = rev.removeprefix("refs/heads/")
                if branch not in repo.branches:
                    return self._missing("revision not found (commits go to a branch)")
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                if not lines or lines[0]["key"] != "header":
                    return self._error(400, None, "the commit payload starts with its header")
                header = lines[0]["value"]
                parent = repo.branches[branch]
                if header.get("parentCommit") not in (None, parent):
                    return self._error(412, None, "A commit has happened since the parent commit")
                files = dict(repo.commits[parent])
                for item in lines[1:]:
                    key, value = item["key"], item["value"]
                    if key == "file":
                        files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
                    elif key == "lfsFile":
                        data = hub.lfs_objects.get(value["oid"])
                        if data is None:
                            return self._error(400, None, f"LFS object {value['oid']} of {value['path']} "
                                                          "was never uploaded")
                        files[value["path"]] = StoredFile(data, True)
                    elif key == "deletedFile":
                        files.pop(value["path"], None)
                    else:
                        return self._error(400, None, f"commit item {key!r} is not served here")
                oid = hub._new_commit(repo, parent, files, header["summary"], header.get("description", ""))
                repo.branches[branch] = oid
                return self._json({"success": True, "commitOid": oid, "commitUrl": f"{hub.url}/{repo_id}/commit/{oid}",
                                   "commitMessage": header["summary"]})

            def _tag(self, repo: Repo, rev: str, payload: dict) -> None:
                commit = repo.resolve(rev)
                if commit is None:
                    return self._missing("revision not found")
                if payload["tag"] in repo.tags:
                    return self._error(409, None, f"Tag {payload['tag']} already exists")
                repo.tags[payload["tag"]] = commit
                return self._json({})

            def do_HEAD(self) -> None:  # noqa: N802
                self._route("HEAD")

            def do_GET(self) -> None:  # noqa: N802
                self._route("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._route("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._route("PUT")

        return Handler
