"""The pin bump as a pull request, through GitHub's REST API (docs/nightly.md).

The worker, not the recipe, names the repository: a recipe arrives in a pull request and must not choose
where a token writes. ``QUANTKIT_PIN_REPO=owner/name`` turns it on, ``QUANTKIT_PIN_BASE`` is the branch the
recipe lives on (default main), ``QUANTKIT_PIN_API`` the API root (default https://api.github.com; a GitHub
Enterprise's ``https://HOST/api/v3``), and the token comes from ``$GITHUB_TOKEN`` only, never logged.
GitHub only: a repository URL or an API root of another forge (GitLab, Gitea, Forgejo, Bitbucket, Azure
DevOps) is refused by ``Forge.from_env`` with what to do instead (the run folder's patch works anywhere).

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
from urllib.parse import quote, urlsplit

from quantkit.errors import PublishError

log = logging.getLogger(__name__)

REPO_ENV, BASE_ENV, API_ENV, TOKEN_ENV = "QUANTKIT_PIN_REPO", "QUANTKIT_PIN_BASE", "QUANTKIT_PIN_API", "GITHUB_TOKEN"
DEFAULT_API = "https://api.github.com"
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}/[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
# Other forges, told apart by their host or their API root, so that the worker's setting is refused with
# what to do instead of failing on the first call with a 404 (their APIs differ from GitHub's in every call).
_OTHER_FORGES = (("gitlab", "GitLab"), ("gitea", "Gitea"), ("forgejo", "Forgejo"), ("codeberg", "Codeberg (Forgejo)"),
                 ("bitbucket", "Bitbucket"), ("/api/v4", "GitLab"), ("/api/v1", "Gitea or Forgejo"),
                 ("dev.azure.com", "Azure DevOps"))
SUPPORTED = ("only GitHub's REST API is spoken (github.com: the default API root; GitHub Enterprise: "
             f"{API_ENV}=https://HOST/api/v3); with another forge, leave {REPO_ENV} unset and apply the run "
             "folder's pin-bump.patch (git apply)")


class UnsupportedForge(PublishError):
    """The worker's pull-request settings name something other than a GitHub repository and API."""

    tip = "docs/nightly.md: the pull request of the pin bump"


def _other_forge(url: str) -> str | None:
    """The name of the non-GitHub forge ``url`` belongs to, when it is recognisable."""
    parts = urlsplit(url)
    where = f"{(parts.hostname or '').lower()}{parts.path.rstrip('/').lower()}"
    return next((name for mark, name in _OTHER_FORGES if mark in where), None)


def check_api(api: str) -> str:
    """``api`` (the REST root) when it can be GitHub's, else UnsupportedForge saying what is supported."""
    parts = urlsplit(api)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise UnsupportedForge(f"{API_ENV}={api!r} is not an http(s) URL of a REST API root; {SUPPORTED}")
    other = _other_forge(api)
    if other:
        raise UnsupportedForge(f"{API_ENV}={api!r} is {other}'s API, not GitHub's: {SUPPORTED}")
    return api.rstrip("/")


def check_repo(repo: str) -> str:
    """``repo`` when it is owner/name; a repository URL is refused with the setting it should have been."""
    if "://" in repo or repo.startswith("git@"):
        parts = urlsplit(repo if "://" in repo else "ssh://" + repo.replace(":", "/", 1))
        path = parts.path.strip("/").removesuffix(".git")
        other = _other_forge(repo)
        if other:
            raise UnsupportedForge(f"{REPO_ENV}={repo!r} is a {other} repository: {SUPPORTED}")
        raise UnsupportedForge(f"{REPO_ENV}={repo!r} is a URL; it names the repository as owner/name"
                               + (f" ({REPO_ENV}={path})" if _REPO.match(path) else "") + f"; {SUPPORTED}")
    if not _REPO.match(repo):
        raise PublishError(f"{REPO_ENV}={repo!r} is not owner/name")
    return repo


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
        repo = check_repo(repo)
        if not _BRANCH.match(base) or ".." in base:
            raise PublishError(f"{BASE_ENV}={base!r} is not a branch name")
        api = check_api(os.environ.get(API_ENV) or DEFAULT_API)
        token = os.environ.get(TOKEN_ENV)
        if not token:
            raise PublishError(f"{REPO_ENV} is set, and opening a pull request needs ${TOKEN_ENV} (it is not set)")
        return cls(repo, base, api, token)

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
            # GitHub answers every REST call with its X-GitHub-Request-Id; a 404 without it is another server.
            hint = "" if e.code != 404 or e.headers.get("X-GitHub-Request-Id") or self.api == DEFAULT_API else \
                f" ({self.api} may not be a GitHub REST API root: {SUPPORTED})"
            raise PublishError(f"{method} {path} on {self.repo}: HTTP {e.code}: {detail}{hint}") from None
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
