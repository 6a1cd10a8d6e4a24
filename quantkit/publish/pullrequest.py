"""The pin bump as a pull request, through GitHub's REST API (docs/nightly.md).

The worker, not the recipe, names the repository: a recipe arrives in a pull request and must not choose
where a token writes. ``QUANTKIT_PIN_REPO=owner/name`` turns it on, ``QUANTKIT_PIN_BASE`` is the branch the
recipe lives on (default main), ``QUANTKIT_PIN_API`` the API root (default https://api.github.com; a GitHub
Enterprise's ``https://HOST/api/v3``), and the token comes from ``$GITHUB_TOKEN`` only, never logged.

The calls, as GitHub documents them (docs.github.com/en/rest: git/refs, repos/contents, pulls): read the
base branch's commit (``GET /repos/{o}/{r}/git/ref/heads/{base}``) and the recipe there (``GET
/repos/{o}/{r}/contents/{path}?ref={base}``), refuse when that file is not the one the run started from,
create a branch (``POST /repos/{o}/{r}/git/refs``), commit the re-pinned recipe to it (``PUT
/repos/{o}/{r}/contents/{path}``) and open the pull request (``POST /repos/{o}/{r}/pulls``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import quote

from quantkit.errors import PublishError

log = logging.getLogger(__name__)

REPO_ENV, BASE_ENV, API_ENV, TOKEN_ENV = "QUANTKIT_PIN_REPO", "QUANTKIT_PIN_BASE", "QUANTKIT_PIN_API", "GITHUB_TOKEN"
DEFAULT_API = "https://api.github.com"
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}/[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


@dataclass(frozen=True)
class Forge:
    repo: str
    base: str
    api: str
    token: str

    @classmethod
    def from_env(cls) -> Forge | None:
        """The worker's settings, or None when it names no repository."""
        repo = os.environ.get(REPO_ENV)
        if not repo:
            return None
        base = os.environ.get(BASE_ENV) or "main"
        if not _REPO.match(repo) or not _BRANCH.match(base) or ".." in base:
            raise PublishError(f"{REPO_ENV}={repo!r} / {BASE_ENV}={base!r} is not owner/name and a branch name")
        token = os.environ.get(TOKEN_ENV)
        if not token:
            raise PublishError(f"{REPO_ENV} is set, and opening a pull request needs ${TOKEN_ENV} (it is not set)")
        return cls(repo, base, (os.environ.get(API_ENV) or DEFAULT_API).rstrip("/"), token)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.api}/repos/{self.repo}/{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Accept": "application/vnd.github+json",
                     "X-GitHub-Api-Version": "2022-11-28", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            raise PublishError(f"{method} {path} on {self.repo}: HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise PublishError(f"{method} {path} on {self.repo}: {e.reason}") from None


def open_pin_pr(forge: Forge, *, path: str, started_from_sha256: str, new_text: str, recipe: str, run_id: str,
                body: str) -> str:
    """Open a pull request that writes ``new_text`` to ``path`` on a new branch; return its URL. Refused
    (PublishError) when the base branch's ``path`` is not the file the run started from (sha256)."""
    quoted = quote(path)
    base = forge.call("GET", f"git/ref/heads/{quote(forge.base)}")["object"]["sha"]
    current = forge.call("GET", f"contents/{quoted}?ref={quote(forge.base)}")
    found = base64.b64decode(current.get("content") or "")
    if hashlib.sha256(found).hexdigest() != started_from_sha256:
        raise PublishError(f"{path} on {forge.repo}@{forge.base} is not the recipe this run started from (it changed "
                           "since): no pull request; the patch is in the run folder")
    branch = f"quantkit/pin-{recipe}-{run_id}"
    forge.call("POST", "git/refs", {"ref": f"refs/heads/{branch}", "sha": base})
    forge.call("PUT", f"contents/{quoted}", {
        "message": f"{recipe}: pin what release {run_id} was made from", "branch": branch, "sha": current["sha"],
        "content": base64.b64encode(new_text.encode("utf-8")).decode()})
    pr = forge.call("POST", "pulls", {"title": f"{recipe}: new pins from the nightly (release {run_id})",
                                      "head": branch, "base": forge.base, "body": body})
    log.info("opened %s: the pin bump of %s", pr.get("html_url"), recipe)
    return pr["html_url"]
