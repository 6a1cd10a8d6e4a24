"""The nightly's tracking run (#30): compare with the last release, then publish or hold; end to end on the
tiny Llama served by the local Hub, where a pushed commit (a chat template fix) is picked up, rebuilt from
convert on, compared, published and proposed as a pin bump, and a night with no upstream change reuses
everything and publishes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from test_report import CHATML, CONFIG, RECIPE_YAML, make_manifest, make_run_dir

from quantkit.publish import release as pub
from quantkit.recipe import Publish

C1 = "c1" * 20
PATCH = "--- a/recipes/x.yaml\n+++ b/recipes/x.yaml\n@@ -1 +1 @@\n-  revision: old\n+  revision: new\n"


def _release(tmp_path, manifest, name, run_id, tracking=None):
    return pub.release(run_dir=make_run_dir(tmp_path, manifest, name), manifest=manifest, root=tmp_path,
                       settings=Publish(), recipe_yaml=RECIPE_YAML, config=CONFIG, chat_template=CHATML,
                       run_id=run_id, tracking=tracking)


def _moved(manifest: dict) -> dict:
    manifest["model"] = {**manifest["model"], "commit": "b" * 40, "revision": "b" * 40}
    manifest["variants"][4]["files"]["model.gguf"]["sha256"] = "ff" * 32  # Q4_K_M rebuilt: other bytes
    return manifest


def test_a_tracked_change_that_fails_the_gate_is_held_with_its_reason(tmp_path):
    first = _release(tmp_path, make_manifest(), "run1", "r1")
    assert first.status == "published r1"
    worse = _moved(make_manifest(Q4_K_M=0.2))  # mean KLD 0.060 -> 0.200, errors 0.0012 each
    held = _release(tmp_path, worse, "run2", "r2", tracking={"patch": PATCH})
    assert held.held.startswith("failed: gguf:Q4_K_M kld_mean: mean KLD 0.06000 → 0.20000")
    assert held.status.startswith("held: failed") and held.pin_patch is None
    folder = tmp_path / "artifacts" / "smollm2-135m-demo"
    assert os.readlink(folder / "latest") == "r1" and not (folder / "r2").exists()
    assert not (tmp_path / "run2" / "pin-bump.patch").exists()
    md = (tmp_path / "run2" / "report" / "report.md").read_text()
    assert "## Since the last release (r1)" in md
    assert f"**Held, not published**: {held.held}" in md
    assert f"What changed: model commit `{'a' * 40}` → `{'b' * 40}`. Unchanged: llama.cpp commit `0c1e570`" in md
    assert "| gguf:Q4_K_M | rebuilt, other bytes | kld_mean | 0.06000 | 0.20000 | +0.14000 ± 0.00170 | failed |" in md
    since = json.loads((tmp_path / "run2" / "report" / "report.json").read_text())["since_release"]
    assert since["same_sets"] and [i["changed"] for i in since["inputs"]] == [True, False, False]


def test_an_inconclusive_check_holds_a_tracked_change_that_a_plain_run_would_publish(tmp_path):
    _release(tmp_path, make_manifest(), "run1", "r1")
    # 0.060 -> 0.0665 against a limit of 0.066 (+10 %), with a combined error of 0.0017: straddles it.
    assert _release(tmp_path, _moved(make_manifest(Q4_K_M=0.0665)), "run2", "r2").status == "published r2"
    shutil.rmtree(tmp_path / "artifacts")
    _release(tmp_path, make_manifest(), "run3", "r1")
    held = _release(tmp_path, _moved(make_manifest(Q4_K_M=0.0665)), "run4", "r2", tracking={"patch": PATCH})
    assert held.held.startswith("not shown with its error: gguf:Q4_K_M kld_mean")
    # A task score that moved, with no item count to give its error, does not pass with its error either.
    shutil.rmtree(tmp_path / "artifacts")
    _release(tmp_path, make_manifest(), "run5", "r1")
    better = _moved(make_manifest())
    better["variants"][4]["scores"]["tasks"]["arc_easy"] = 0.61
    held = _release(tmp_path, better, "run6", "r2", tracking={"patch": PATCH})
    assert held.held.startswith("not shown with its error: gguf:Q4_K_M task:arc_easy: arc_easy 0.5893 → 0.6100")


def test_a_tracked_change_that_passes_is_published_with_its_pin_bump(tmp_path):
    _release(tmp_path, make_manifest(), "run1", "r1")
    same_scores = _moved(make_manifest())
    published = _release(tmp_path, same_scores, "run2", "r2", tracking={"patch": PATCH})
    assert published.status == "published r2"
    assert published.pin_patch == tmp_path / "run2" / "pin-bump.patch"
    assert published.pin_patch.read_text() == PATCH
    md = (published.path / "report.md").read_text()
    assert "| gguf:Q4_K_M | rebuilt, other bytes | kld_mean | 0.06000 | 0.06000 | +0.00000 ± 0.00000 | passed |" in md
    assert "| gguf:Q8_0 | same bytes | kld_mean |" in md


def test_the_other_evaluation_settings_hold_a_tracked_change(tmp_path):
    _release(tmp_path, make_manifest(), "run1", "r1")
    moved = _moved(make_manifest())
    moved["recipe"]["resolved"]["evaluation"]["ctx"] = 1024
    held = _release(tmp_path, moved, "run2", "r2", tracking={"patch": PATCH})
    assert held.held.startswith("scored on other evaluation settings than r1")


# --- end to end: the tiny Llama on the local Hub ----------------------------------------------------------

RECIPE = textwrap.dedent(f"""\
    # The nightly's recipe: a plain run keeps these pins; `quantkit run --track` follows main.
    name: tiny-nightly
    model:
      repo: org/tiny-llama
      revision: {C1}   # the release's commit
      track: main      # what the nightly follows
      name: tiny-llama
    calibration:
      files: [calibration/en-prose.txt]
    evaluation:
      file: calibration/eval/en-prose-heldout.txt
      ctx: 128
      max_tokens: 1024
      bench: false
    gguf:
      base_type: f16
      imatrix: {{enabled: false}}
      types: [Q4_K_M]
    """)


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, repo_root, tiny_llama, toolchain):
    """A project with the recipe, the local Hub serving the tiny Llama at C1 on main, and a store."""
    from localhub import LocalHub

    root = tmp_path_factory.mktemp("nightly")
    (root / "recipes").mkdir()
    (root / "recipes" / "tiny.yaml").write_text(RECIPE)
    shutil.copytree(repo_root / "calibration", root / "calibration")
    with LocalHub("org/tiny-llama", tiny_llama, C1) as hub, pytest.MonkeyPatch.context() as mp:
        on_local_hub(mp, hub, root)
        yield root, hub


def on_local_hub(mp: pytest.MonkeyPatch, hub, root: Path) -> None:
    """huggingface_hub in this process talks to ``hub``, with a cache, project and store under ``root``."""
    from huggingface_hub import constants

    mp.setattr(constants, "ENDPOINT", hub.url)
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
    mp.setattr(constants, "HF_HUB_CACHE", str(root / "hf-cache"))
    mp.setenv("HF_ENDPOINT", hub.url)
    mp.delenv("HF_HUB_OFFLINE", raising=False)
    mp.setenv("HF_TOKEN", "hf_localhubtoken")
    mp.setenv("QUANTKIT_PROJECT", str(root))
    mp.setenv("QUANTKIT_STORE", str(root / "store"))


def push_template_fix(hub) -> tuple[str, str]:
    """A new commit on the local Hub's main: the chat template fixed. Returns (commit, template)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    template = "{# tool calls fixed #}" + hub.tree("org/tiny-llama")["chat_template.jinja"].decode()
    commit = HfApi().create_commit(repo_id="org/tiny-llama", commit_message="Fix the chat template", operations=[
        CommitOperationAdd("chat_template.jinja", template.encode())])
    return commit.oid, template


def _run(capsys, *args) -> str:
    from quantkit.cli import main

    assert main(list(args)) == 0
    return capsys.readouterr().out


def _line(out: str, prefix: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(prefix))


@pytest.mark.slow
def test_nightly_reuses_an_unchanged_upstream_then_picks_up_a_new_commit(nightly, capsys):
    from quantkit.ggufinfo import chat_template

    root, hub = nightly
    recipe = root / "recipes" / "tiny.yaml"
    folder = root / "artifacts" / "tiny-nightly"
    out = _run(capsys, "run", str(recipe))  # the release the nightly compares with
    first = os.readlink(folder / "latest")
    assert _line(out, "published:").endswith(first)

    # A night with nothing new upstream: every step reused, nothing published.
    out = _run(capsys, "run", "--track", str(recipe))
    assert f"track: model: org/tiny-llama main is at {C1}; the recipe pins {C1}: unchanged" in out
    assert f"not published: unchanged since {first}" in out
    assert _line(out, "built:") == "built: nothing (every step was already done)"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [first, "latest",
                                                                                       "unchanged.jsonl"]

    # Upstream fixes its chat template.
    c2, template = push_template_fix(hub)
    assert c2 != C1

    out = _run(capsys, "plan", "--track", str(recipe))
    assert f"track: model: org/tiny-llama main is at {c2}; the recipe pins {C1}: changed" in out
    assert not (root / "runs" / "tiny-nightly.tracked").exists()  # a plan writes nothing
    status = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()[:1] in (
        ["source"], ["convert"], ["quantize:Q4_K_M"])}
    assert status == {"source": "to", "convert": "to", "quantize:Q4_K_M": "to"}  # the new commit: "to do"
    assert "not on disk yet" in next(line for line in out.splitlines() if line.startswith("source"))

    out = _run(capsys, "run", "--track", str(recipe))
    assert f"track: running with the new pins: {root / 'runs' / 'tiny-nightly.tracked' / 'recipe.yaml'}" in out
    # Rebuilt from convert on (the model folder is new), nothing earlier reused under another name.
    built = _line(out, "built:").removeprefix("built: ").split(", ")
    assert built[:2] == ["convert", "quantize:Q4_K_M"] and "score-gguf:Q4_K_M" in built
    assert "reused:" not in out
    second = os.readlink(folder / "latest")
    assert second != first and _line(out, "published:").endswith(second)
    manifest = json.loads((folder / second / "manifest.json").read_text())
    assert manifest["model"]["commit"] == c2 and manifest["model"]["revision"] == c2
    assert chat_template(folder / second / "tiny-llama-Q4_K_M.gguf") == template
    md = (folder / second / "report.md").read_text()
    assert f"## Since the last release ({first})" in md
    assert f"What changed: model commit `{C1}` → `{c2}`. Unchanged: llama.cpp commit `0c1e570`" in md
    row = next(line for line in md.splitlines() if line.startswith("| gguf:Q4_K_M | rebuilt, other bytes | kld_mean"))
    assert row.endswith("| +0.00000 ± 0.00000 | passed |")  # the same weights: the same KLD, to the digit
    # The pin bump: the recipe with the new commit, comments kept, as a patch that git applies.
    patch = root / "runs" / "tiny-nightly" / "pin-bump.patch"
    assert _line(out, "pin bump:").startswith(f"pin bump: {patch}")
    assert f"-  revision: {C1}   # the release's commit\n+  revision: {c2}   # the release's commit\n" in \
        patch.read_text()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "apply", "--check", str(patch)], cwd=root, check=True)
    assert (folder / second / "recipe.yaml").read_text() == recipe.read_text().replace(C1, c2)

    # The next night, before the bump is merged: the same new pins, everything reused, nothing published.
    out = _run(capsys, "run", "--track", str(recipe))
    assert f"not published: unchanged since {second}" in out
    assert _line(out, "built:") == "built: nothing (every step was already done)"


# --- the pin bump as a pull request, against a local server answering as GitHub's REST API -----------------

class FakeGitHub:
    """The five calls of quantkit.publish.pullrequest, answered as docs.github.com/en/rest documents them,
    over one repository held in memory."""

    def __init__(self, files: dict[str, bytes]):
        import hashlib
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.branches = {"main": "0" * 40}
        self.files = {"main": dict(files)}
        self.pulls: list[dict] = []
        self.auth: list[str] = []
        gh = self

        def blob(data: bytes) -> str:
            return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                import base64
                from urllib.parse import parse_qs, unquote, urlsplit

                gh.auth.append(self.headers.get("Authorization") or "")
                url = urlsplit(self.path)
                parts = unquote(url.path).strip("/").split("/")
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if parts[:3] != ["repos", "me", "recipes"]:
                    return self._json(404, {"message": "Not Found"})
                rest = parts[3:]
                if method == "GET" and rest[:3] == ["git", "ref", "heads"]:
                    return self._json(200, {"object": {"sha": gh.branches["/".join(rest[3:])]}})
                if method == "GET" and rest[0] == "contents":
                    ref = parse_qs(url.query)["ref"][0]
                    data = gh.files[ref]["/".join(rest[1:])]
                    return self._json(200, {"sha": blob(data), "content": base64.b64encode(data).decode()})
                if method == "POST" and rest == ["git", "refs"]:
                    name = body["ref"].removeprefix("refs/heads/")
                    if name in gh.branches:
                        return self._json(422, {"message": "Reference already exists"})
                    gh.branches[name] = body["sha"]
                    gh.files[name] = dict(gh.files["main"])
                    return self._json(201, {"ref": body["ref"]})
                if method == "PUT" and rest[0] == "contents":
                    path = "/".join(rest[1:])
                    if body["sha"] != blob(gh.files[body["branch"]][path]):
                        return self._json(409, {"message": "sha does not match"})
                    gh.files[body["branch"]][path] = base64.b64decode(body["content"])
                    return self._json(200, {"commit": {"sha": "1" * 40}})
                if method == "POST" and rest == ["pulls"]:
                    gh.pulls.append(body)
                    return self._json(201, {"html_url": f"https://github.test/me/recipes/pull/{len(gh.pulls)}"})
                return self._json(404, {"message": "Not Found"})

            def do_GET(self):  # noqa: N802
                self._route("GET")

            def do_POST(self):  # noqa: N802
                self._route("POST")

            def do_PUT(self):  # noqa: N802
                self._route("PUT")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_the_pin_bump_opens_a_pull_request_when_the_worker_names_a_repository(tmp_path, monkeypatch, caplog):
    import hashlib

    original = b"name: smollm2-135m-demo\nmodel:\n  repo: org/x\n  revision: old\n"
    gh = FakeGitHub({"recipes/x.yaml": original})
    try:
        monkeypatch.setenv("QUANTKIT_PIN_REPO", "me/recipes")
        monkeypatch.setenv("QUANTKIT_PIN_API", gh.url)
        monkeypatch.setenv("GITHUB_TOKEN", "ghp_localtoken")
        tracking = {"patch": PATCH, "recipe": "recipes/x.yaml", "recipe_sha256": hashlib.sha256(original).hexdigest()}
        _release(tmp_path, make_manifest(), "run1", "r1")
        published = _release(tmp_path, _moved(make_manifest()), "run2", "r2", tracking=tracking)
        assert published.pin_pr == "https://github.test/me/recipes/pull/1"
        (pr,) = gh.pulls
        assert (pr["head"], pr["base"]) == ("quantkit/pin-smollm2-135m-demo-r2", "main")
        assert "## Since the last release (r1)" in pr["body"]
        assert gh.files["quantkit/pin-smollm2-135m-demo-r2"]["recipes/x.yaml"] == RECIPE_YAML.encode()
        assert gh.files["main"]["recipes/x.yaml"] == original  # only the branch has the new pins
        assert set(gh.auth) == {"Bearer ghp_localtoken"}
        # The recipe changed on main since the run started: no pull request, the release stands.
        gh.files["main"]["recipes/x.yaml"] = original + b"# edited\n"
        third = _release(tmp_path, _moved(make_manifest(Q4_K_M=0.059)), "run3", "r3", tracking=tracking)
        assert third.status == "published r3" and third.pin_pr is None and len(gh.pulls) == 1
        assert "is not the recipe this run started from" in caplog.text
        assert "ghp_localtoken" not in caplog.text
    finally:
        gh.close()



@pytest.mark.parametrize("env, message", [
    ({"QUANTKIT_PIN_API": "https://gitlab.com/api/v4"},
     "QUANTKIT_PIN_API='https://gitlab.com/api/v4' is GitLab's API, not GitHub's: only GitHub's REST API is spoken"),
    ({"QUANTKIT_PIN_API": "https://codeberg.org/api/v1/"},
     "QUANTKIT_PIN_API='https://codeberg.org/api/v1/' is Codeberg (Forgejo)'s API, not GitHub's"),
    ({"QUANTKIT_PIN_API": "https://git.example.com/api/v1"}, "is Gitea or Forgejo's API, not GitHub's"),
    ({"QUANTKIT_PIN_API": "ftp://api.github.com"}, "QUANTKIT_PIN_API='ftp://api.github.com' is not an http(s) URL"),
    ({"QUANTKIT_PIN_REPO": "https://gitlab.com/me/recipes"},
     "QUANTKIT_PIN_REPO='https://gitlab.com/me/recipes' is a GitLab repository: only GitHub's REST API is spoken"),
    ({"QUANTKIT_PIN_REPO": "https://github.com/me/recipes.git"},
     "QUANTKIT_PIN_REPO='https://github.com/me/recipes.git' is a URL; it names the repository as owner/name "
     "(QUANTKIT_PIN_REPO=me/recipes)"),
    ({"QUANTKIT_PIN_REPO": "git@github.com:me/recipes.git"}, "is a URL; it names the repository as owner/name "
                                                             "(QUANTKIT_PIN_REPO=me/recipes)"),
])
def test_a_forge_other_than_github_is_refused_with_what_to_do(monkeypatch, env, message):
    from quantkit.publish.pullrequest import Forge, UnsupportedForge

    monkeypatch.setenv("QUANTKIT_PIN_REPO", "me/recipes")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_localtoken")
    monkeypatch.delenv("QUANTKIT_PIN_API", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UnsupportedForge) as e:
        Forge.from_env()
    assert message in str(e.value)
    assert "apply the run folder's pin-bump.patch (git apply)" in str(e.value)
    assert e.value.tip == "docs/nightly.md: the pull request of the pin bump"


def test_github_enterprise_is_accepted_and_a_release_with_another_forge_keeps_its_patch(tmp_path, monkeypatch,
                                                                                       caplog):
    """GitHub Enterprise's API root passes; with GitLab's, the release is published, no request is sent
    anywhere, and the warning says why there is no pull request."""
    import urllib.request

    from quantkit.publish.pullrequest import Forge

    monkeypatch.setenv("QUANTKIT_PIN_REPO", "me/recipes")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_localtoken")
    monkeypatch.setenv("QUANTKIT_PIN_API", "https://ghe.example.com/api/v3/")
    assert Forge.from_env().api == "https://ghe.example.com/api/v3"
    monkeypatch.setenv("QUANTKIT_PIN_API", "https://gitlab.example.com/api/v4")
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("a request was sent"))
    _release(tmp_path, make_manifest(), "run1", "r1")
    tracking = {"patch": PATCH, "recipe": "recipes/x.yaml", "recipe_sha256": "0" * 64}
    published = _release(tmp_path, _moved(make_manifest()), "run2", "r2", tracking=tracking)
    assert published.status == "published r2" and published.pin_pr is None
    assert published.pin_patch.read_text() == PATCH
    assert "no pull request for the pin bump: QUANTKIT_PIN_API='https://gitlab.example.com/api/v4' is GitLab's " \
           "API, not GitHub's" in caplog.text


def test_a_server_that_is_not_githubs_api_is_named_in_the_error(monkeypatch):
    """An API root quantkit cannot tell apart (a bare host) fails on its first call; the 404 without GitHub's
    request id says the root may not be GitHub's."""
    from quantkit.errors import PublishError
    from quantkit.publish.pullrequest import Forge, open_pin_pr

    gh = FakeGitHub({"recipes/x.yaml": b"x"})
    try:
        forge = Forge("me/other", "main", gh.url, "ghp_localtoken")  # FakeGitHub serves me/recipes only
        with pytest.raises(PublishError, match=r"GET git/ref/heads/main on me/other: HTTP 404: .*Not Found.* \("
                                               + gh.url + " may not be a GitHub REST API root: only GitHub's"):
            open_pin_pr(forge, path="recipes/x.yaml", started_from_sha256="0" * 64, new_text="y", recipe="x",
                        run_id="r2", body="b")
    finally:
        gh.close()


# --- a newer llama.cpp release on a local package index -------------------------------------------------

TOOLCHAIN_RECIPE = textwrap.dedent("""\
    name: tiny-llama-cpp
    model:
      path: models/tiny
      name: tiny-llama
    calibration:
      files: [calibration/en-prose.txt]
    evaluation:
      file: calibration/eval/en-prose-heldout.txt
      ctx: 128
      max_tokens: 1024
      bench: false
    gguf:
      base_type: f16
      imatrix: {enabled: false}
      types: [Q4_K_M]
    toolchain:
      track: latest   # the nightly's llama.cpp
    """)


def repacked_release(index: Path, version: str, commit: str, src: Path) -> Path:
    """A llama-cpp-python sdist of ``version`` whose CHANGELOG names llama.cpp ``commit`` and whose
    vendor/llama.cpp is the pinned tree ``src``, byte for byte: a release of another commit name whose
    sources did not change."""
    import io
    import tarfile

    from test_tracking import BACKEND

    top = f"llama_cpp_python-{version}"
    path = index / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in {
                "PKG-INFO": f"Metadata-Version: 2.1\nName: llama-cpp-python\nVersion: {version}\n".encode(),
                "pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "fakebackend"\n'
                                  b'backend-path = ["."]\n',
                "fakebackend.py": BACKEND.replace("{version}", version).encode(),
                "CHANGELOG.md": f"# Changelog\n\n## [{version}]\n\n- feat: update llama.cpp to "
                                f"ggml-org/llama.cpp@{commit}\n".encode()}.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.add(src, f"{top}/vendor/llama.cpp")
    return path


@pytest.mark.slow
def test_a_newer_llama_cpp_release_is_built_in_its_own_folder_and_everything_from_convert_on_reruns(
        tmp_path, monkeypatch, capsys, repo_root, tiny_llama, toolchain):
    """A newer release on a local package index (the pinned tree repacked under 0.3.37, naming another
    commit): the tracking run fetches it, builds it into its own cache folder (its binaries say the new
    commit), records it in the manifest, and every node from convert on gets a new key and runs again. The
    tree is the pinned one, so the build reuses the pinned build's objects: build-info and llama.cpp (which
    print the commit) are compiled, every binary linked, in seconds instead of ~15 min (docs/nightly.md)."""
    from quantkit.toolchain import STAMP, _build_dir, binary_commit, release_dir, tree_sha256

    pinned_build = toolchain.src.parent / "cmake-build"
    if not (pinned_build / "CMakeCache.txt").is_file():
        pytest.skip(f"the pinned toolchain has no CMake build folder beside {toolchain.src} to reuse; a full "
                    "build of the release would take ~15 min on 2 cores")
    root = tmp_path / "project"
    (root / "recipes").mkdir(parents=True)
    recipe = root / "recipes" / "tiny.yaml"
    recipe.write_text(TOOLCHAIN_RECIPE)
    shutil.copytree(repo_root / "calibration", root / "calibration")
    shutil.copytree(tiny_llama, root / "models" / "tiny")
    index = tmp_path / "index"
    index.mkdir()
    for name, value in {"QUANTKIT_PROJECT": root, "QUANTKIT_STORE": root / "store", "PIP_NO_INDEX": "1",
                        "PIP_FIND_LINKS": index, "QUANTKIT_CACHE": tmp_path / "cache",
                        "QUANTKIT_LLAMA_CPP_BIN": toolchain.bin_dir,  # the pinned build, where it is
                        "QUANTKIT_LLAMA_CPP_SRC": toolchain.src}.items():
        monkeypatch.setenv(name, str(value))
    folder = root / "artifacts" / "tiny-llama-cpp"

    out = _run(capsys, "run", str(recipe))  # the release the nightly compares with, on the pinned llama.cpp
    first = os.readlink(folder / "latest")
    before = json.loads((root / "runs" / "tiny-llama-cpp" / "manifest.json").read_text())
    assert before["toolchain"]["llama_cpp"] == "0c1e570"

    repacked_release(index, "0.3.37", "5e6f7a8b9", toolchain.src)
    cache_before = sorted((tmp_path / "cache").rglob("*"))  # the run may have built quantkit.drainlog's library
    out = _run(capsys, "plan", "--track", str(recipe))
    assert "is 0.3.37; the recipe builds with 0.3.36: changed (fetched and built by the run" in out
    assert sorted((tmp_path / "cache").rglob("*")) == cache_before  # a plan fetches and builds nothing
    assert not release_dir("0.3.37", cuda=False).exists()

    out = _run(capsys, "run", "--track", str(recipe))
    built = release_dir("0.3.37", cuda=False)
    assert built != _build_dir(False) and built.parent == tmp_path / "cache" / "llama.cpp"
    stamp = json.loads((built / STAMP).read_text())
    assert stamp["llama_cpp_commit"] == "5e6f7a8" and stamp["package"] == "llama-cpp-python==0.3.37"
    assert stamp["objects_from"] == str(pinned_build) and stamp["tree_sha256"] == tree_sha256(toolchain.src)
    # Compiled and linked with the new commit, each binary; the pinned build's still say the pin.
    assert {b.name: binary_commit(b) for b in (built / "bin").iterdir() if b.name != "llama-quantize"} == \
        {b: "5e6f7a8" for b in ("llama-imatrix", "llama-perplexity", "llama-bench", "llama-server",
                                "llama-gguf-split")}
    assert binary_commit(toolchain.binary("llama-perplexity")) == "0c1e570"
    after = json.loads((root / "runs" / "tiny-llama-cpp" / "manifest.json").read_text())
    assert after["toolchain"]["llama_cpp"] == "5e6f7a8"
    assert after["toolchain"]["version"] == "llama.cpp 5e6f7a8 (llama-cpp-python 0.3.37)"
    # Everything from convert on ran again under new keys, nothing was reused.
    assert "reused:" not in out
    keys = {s["step"]: s["key"] for s in before["steps"]}
    new_keys = {s["step"]: s["key"] for s in after["steps"]}
    assert "convert" in keys and keys.keys() == new_keys.keys()
    assert not set(keys.values()) & set(new_keys.values())
    assert not any(s["reused"] for s in after["steps"])
    assert {s["toolchain_dir"] for s in after["steps"]} == {str(built / "bin")}
    assert set(_line(out, "built:").removeprefix("built: ").split(", ")) >= set(keys)
    # An input changed (the llama.cpp commit) and the comparison passes with its error: published, with the
    # pin bump naming the release by its bytes. The same tree gave the same files and scores.
    second = os.readlink(folder / "latest")
    assert second != first and _line(out, "published:").endswith(second)
    md = (folder / second / "report.md").read_text()
    assert "What changed: llama.cpp commit `0c1e570` → `5e6f7a8`." in md
    assert "| gguf:Q4_K_M | same bytes | kld_mean |" in md and \
        next(line for line in md.splitlines() if line.startswith("| gguf:Q4_K_M | same bytes")).endswith("| passed |")
    sha = __import__("hashlib").sha256((index / "llama_cpp_python-0.3.37.tar.gz").read_bytes()).hexdigest()
    patch = (root / "runs" / "tiny-llama-cpp" / "pin-bump.patch").read_text()
    assert "   track: latest   # the nightly's llama.cpp\n+  version: 0.3.37\n+  sdist_sha256: " + sha in patch

    # The next plan knows the release is built, and shows those nodes done under its keys.
    out = _run(capsys, "plan", "--track", str(recipe))
    assert f"; built in {built})" in out
    status = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()[:1] in (
        ["convert"], ["quantize:Q4_K_M"])}
    assert status == {"convert": "done", "quantize:Q4_K_M": "done"}
