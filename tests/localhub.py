"""A Hugging Face Hub on 127.0.0.1, for the download path of tests that must not reach the network.

It answers the requests huggingface_hub's snapshot_download makes (revision info, the file tree,
HEAD and GET of /resolve/ with Range) over files from a local folder, pinned to one commit and one
tag. It records every path requested and every Authorization header, and can throttle a file so a
test can kill a download halfway. Point huggingface_hub at it with HF_ENDPOINT=hub.url.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")  # served as LFS files, as the Hub does for weights


class LocalHub:
    def __init__(self, repo_id: str, folder: Path, commit: str, tag: str):
        self.repo_id, self.commit, self.tag = repo_id, commit, tag
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
                      if p.is_file()}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.authorizations: list[str] = []
        self.throttle: dict[str, float] = {}  # file -> bytes per second
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def served(self, name: str) -> bool:
        return any(method == "GET" and path.endswith(f"/resolve/{self.commit}/{name}")
                   for method, path in self.requests)

    # --- what the Hub would answer -----------------------------------------------------------------

    def _entry(self, path: str) -> dict:
        data = self.files[path]
        entry = {"type": "file", "path": path, "size": len(data),
                 "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}  # git's blob id
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _etag(self, path: str) -> str:
        entry = self._entry(path)
        return entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]

    def _resolve(self, rev: str) -> str | None:
        return self.commit if rev in {self.commit, self.tag} else None

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _json(self, obj, status: int = 200) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _missing(self, what: str) -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound" if "file" in what else "RevisionNotFound")
                self.send_header("X-Error-Message", what)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _route(self, method: str) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((method, path))
                if auth := self.headers.get("Authorization"):
                    hub.authorizations.append(auth)
                api = f"/api/models/{hub.repo_id}/"
                if path.startswith(api + "revision/"):
                    commit = hub._resolve(path[len(api + "revision/"):])
                    if commit is None:
                        return self._missing("revision not found")
                    return self._json({"id": hub.repo_id, "sha": commit, "private": False,
                                       "siblings": [{"rfilename": f} for f in hub.files]})
                if path.startswith(api + "tree/"):
                    rev, _, sub = path[len(api + "tree/"):].partition("/")
                    if hub._resolve(rev) is None:
                        return self._missing("revision not found")
                    return self._json([hub._entry(f) for f in hub.files if f.startswith(sub)])
                prefix = f"/{hub.repo_id}/resolve/"
                if path.startswith(prefix):
                    rev, _, name = path[len(prefix):].partition("/")
                    if hub._resolve(rev) is None or name not in hub.files:
                        return self._missing("file not found")
                    return self._file(method, name)
                self._missing("not a Hub route")

            def _file(self, method: str, name: str) -> None:
                data = hub.files[name]
                start = 0
                if rng := self.headers.get("Range"):  # bytes=N- (a resumed download)
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{hub._etag(name)}"')
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if method == "HEAD":
                    return
                rate = hub.throttle.get(name)
                step = 64 * 1024
                for offset in range(start, len(data), step):
                    self.wfile.write(data[offset:offset + step])
                    if rate:
                        time.sleep(step / rate)

            def do_HEAD(self) -> None:  # noqa: N802
                self._route("HEAD")

            def do_GET(self) -> None:  # noqa: N802
                self._route("GET")

        return Handler
