"""Tracking upstream (#30): the recipe's ``track`` fields, their resolution against a local Hub and a local
package index, the re-pinned recipe and its patch. The whole tracking run on the tiny Llama is in
tests/test_nightly.py."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from quantkit.cli import main
from quantkit.recipe import load_recipe
from quantkit.tracking import pin_patch, pinned_text

C1 = "a1" * 20
C2 = "b2" * 20

BASE = """\
name: tracked
model:
  repo: org/tiny   # the model we follow
  revision: {rev}  # the pin a plain run uses
{track}calibration:
  files: [calibration/calib.txt]
gguf:
  types: [Q8_0]
{toolchain}"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "calib.txt").write_text("Calibration paragraph. " * 10 + "\n")
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("QUANTKIT_PROJECT", str(tmp_path))
    return tmp_path


def write(project: Path, text: str) -> Path:
    path = project / "recipes" / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("track, toolchain, expected", [
    ("  track: ../main\n", "", "recipes/r.yaml:5: model.track: track '../main' is not a branch name or a tag "
                              "pattern"),
    ("  track: main;rm\n", "", "recipes/r.yaml:5: model.track: track 'main;rm' is not a branch name"),
    ("", "toolchain:\n  track: newest\n", "recipes/r.yaml:10: toolchain.track: track 'newest' is not 'latest' or "
                                           "a version range"),
    ("", "toolchain:\n  version: 0.3.37\n", "recipes/r.yaml:10: toolchain.version: 'version' and "
                                             "'sdist_sha256' go together"),
    ("", "toolchain: {version: 0.3.37, sdist_sha256: abc}\n", "recipes/r.yaml:9: toolchain.sdist_sha256: "
                                                              "sdist_sha256 is not a sha256"),
])
def test_bad_track_fields_are_refused_with_their_line(project, capsys, track, toolchain, expected):
    path = write(project, BASE.format(rev=C1, track=track, toolchain=toolchain))
    assert main(["validate", str(path)]) == 2
    assert expected in capsys.readouterr().err


def test_track_on_a_local_model_is_refused(project, capsys):
    path = write(project, "name: t\nmodel:\n  path: models/x\n  track: main\ncalibration:\n"
                          "  files: [calibration/calib.txt]\ngguf: {types: [Q8_0]}\n")
    assert main(["validate", str(path)]) == 2
    assert "recipes/r.yaml:4: model.track: 'track' follows a Hub repo, and this model is a local 'path'" in \
        capsys.readouterr().err


def test_track_fields_validate_and_a_plain_load_keeps_the_pins(project):
    path = write(project, BASE.format(rev=C1, track="  track: main\n",
                                      toolchain="toolchain:\n  track: '>=0.3.36,<0.4'\n"))
    recipe = load_recipe(path)
    assert (recipe.model.revision, recipe.model.track, recipe.toolchain.track) == (C1, "main", ">=0.3.36,<0.4")
    assert recipe.toolchain.version is None  # quantkit's own pin


def test_new_pins_edit_the_lines_and_keep_every_comment(project, tmp_path):
    text = BASE.format(rev=C1, track="  track: main    # nightly follows main\n",
                       toolchain="# llama.cpp: the newest release\ntoolchain:\n  track: latest  # or a range\n")
    new = pinned_text(text, file="recipes/r.yaml", model_commit=C2, toolchain=("0.3.37", "ab" * 32))
    assert new.splitlines() == text.replace(C1, C2).splitlines()[:-1] + [
        "  track: latest  # or a range", "  version: 0.3.37", f"  sdist_sha256: {'ab' * 32}"]
    assert "# the pin a plain run uses" in new and "# nightly follows main" in new
    # The patch applies to the recipe with git, and gives that text.
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "recipes").mkdir()
    (tmp_path / "g" / "recipes" / "r.yaml").write_text(text)
    (tmp_path / "g" / "p.patch").write_text(pin_patch(text, new, "recipes/r.yaml"))
    subprocess.run(["git", "apply", "p.patch"], cwd=tmp_path / "g", check=True)
    assert (tmp_path / "g" / "recipes" / "r.yaml").read_text() == new
    # Pinned again later: the lines now exist and are edited in place.
    newer = pinned_text(new, file="recipes/r.yaml", toolchain=("0.3.38", "cd" * 32))
    assert newer == new.replace("0.3.37", "0.3.38").replace("ab" * 32, "cd" * 32)


def test_flow_style_sections_are_pinned_in_place():
    text = f"name: t\nmodel: {{repo: org/tiny, revision: '{C1}', track: main}}\ntoolchain: {{track: latest}}\n"
    new = pinned_text(text, file="r.yaml", model_commit=C2, toolchain=("0.3.37", "ab" * 32))
    assert new == (f"name: t\nmodel: {{repo: org/tiny, revision: '{C2}', track: main}}\n"
                   f"toolchain: {{version: 0.3.37, sdist_sha256: {'ab' * 32}, track: latest}}\n")


# --- llama-cpp-python releases on a local package index ------------------------------------------------

BACKEND = '''"""Builds nothing: enough for pip to read this sdist's metadata (the llama.cpp tree is what quantkit builds)."""
import os


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = os.path.join(metadata_directory, "llama_cpp_python-{version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: llama-cpp-python\\nVersion: {version}\\n")
    return os.path.basename(info)
'''


def fake_release(folder: Path, version: str, commit: str, tree: dict[str, bytes]) -> Path:
    """A llama-cpp-python sdist as PyPI serves it, in small: PKG-INFO, a build backend pip can ask for its
    metadata, the CHANGELOG line that names the vendored llama.cpp commit, and ``tree`` under vendor/llama.cpp."""
    top = f"llama_cpp_python-{version}"
    files = {"PKG-INFO": f"Metadata-Version: 2.1\nName: llama-cpp-python\nVersion: {version}\n".encode(),
             "pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "fakebackend"\nbackend-path = ["."]\n',
             "fakebackend.py": BACKEND.replace("{version}", version).encode(),
             "CHANGELOG.md": f"# Changelog\n\n## [Unreleased]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@"
                             f"badc0ffee\n\n## [{version}]\n\n- fix: a binding\n\n## [0.3.0]\n\n- feat: update "
                             f"llama.cpp to ggml-org/llama.cpp@{commit}\n".encode(),
             **{f"vendor/llama.cpp/{name}": data for name, data in tree.items()}}
    path = folder / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def package_index(tmp_path, monkeypatch, toolchain):
    """A --find-links folder holding the pinned release and a newer one, whose converter is the pinned
    tree's with one line more; pip is pointed at it alone (no PyPI)."""
    index = tmp_path / "index"
    index.mkdir()
    converter = (toolchain.src / "convert_hf_to_gguf.py").read_bytes()
    fake_release(index, "0.3.36", "0c1e57098", {"convert_hf_to_gguf.py": converter})
    fake_release(index, "0.3.37", "5e6f7a8b9", {"convert_hf_to_gguf.py": converter + b"# 0.3.37\n"})
    fake_release(index, "0.4.0rc1", "999999999", {"convert_hf_to_gguf.py": b"# a pre-release\n"})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    return index


def test_the_vendored_commit_is_the_newest_at_or_below_the_release():
    from quantkit.toolchain import vendored_commit

    # In the form of llama-cpp-python's CHANGELOG.md; 0.3.36's sdist names llama.cpp@0c1e57098 first (the pin).
    log = ("# Changelog\n\n## [Unreleased]\n\n## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n"
           "\n## [0.3.35]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@4df29be4f\n")
    assert vendored_commit(log, "0.3.36").group(1) == "0c1e57098"
    assert vendored_commit(log, "0.3.35").group(1) == "4df29be4f"
    assert vendored_commit("no commit named", "0.3.36") is None


def test_toolchain_track_resolves_the_newest_release_and_fetches_it_beside_the_pin(package_index, toolchain):
    from quantkit.convert import convert_inputs
    from quantkit.source import ModelSnapshot
    from quantkit.toolchain import (PIN, Toolchain, _build_dir, fetch_release, newest_release, release_dir,
                                    release_versions)

    assert set(release_versions()) == {"0.3.36", "0.3.37"}  # pip leaves the pre-release out
    assert newest_release("latest") == "0.3.37"
    assert newest_release("latest", ["0.3.37", "0.4.0rc1"]) == "0.3.37"  # and so does quantkit
    assert newest_release("<0.3.37") == "0.3.36"
    folder = release_dir("0.3.37", cuda=False)
    assert folder.name == "llama-cpp-python-0.3.37-cpu" and folder.parent == _build_dir(False).parent
    assert folder != _build_dir(False)
    pin = fetch_release("0.3.37", folder)
    assert (pin.version, pin.commit) == ("0.3.37", "5e6f7a8")
    assert pin.sdist_sha256 == __import__("hashlib").sha256((package_index / "llama_cpp_python-0.3.37.tar.gz")
                                                           .read_bytes()).hexdigest()
    assert (folder / "src" / "convert_hf_to_gguf.py").read_bytes().endswith(b"# 0.3.37\n")
    assert json.loads((folder / "release.json").read_text())["commit"] == "5e6f7a8"
    # Every GGUF's key starts from the convert step's, which names the llama.cpp commit.
    model = ModelSnapshot(Path("/m"), None, None, None, {}, "d" * 64)
    newer = Toolchain(src=folder / "src", bin_dir=folder / "bin", commit=pin.commit, origin="cache", pin=pin)
    keys = [convert_inputs(model=model, base_type="f16", model_name="m", toolchain=t) for t in (toolchain, newer)]
    assert keys[0] != keys[1] and keys[0]["llama_cpp"] == PIN.commit
    assert newer.version == "llama.cpp 5e6f7a8 (llama-cpp-python 0.3.37)"
    # A wrong pinned sha256 is refused before anything is extracted.
    from quantkit.errors import ToolchainError

    with pytest.raises(ToolchainError, match="the recipe pins"):
        fetch_release("0.3.37", tmp := folder.with_name("other"), sdist_sha256="0" * 64)
    assert not (tmp / "src").exists()


def test_plan_track_says_what_would_change_before_any_work(project, package_index, capsys):
    path = write(project, BASE.format(rev=C1, track="", toolchain="toolchain:\n  track: latest\n"))
    (project / "models").mkdir()
    assert main(["plan", "--track", str(path)]) == 0
    out = capsys.readouterr().out
    assert ("track: toolchain: newest llama-cpp-python for 'latest' is 0.3.37; the recipe builds with 0.3.36: "
            "changed (fetched and built by the run, in its own cache folder)") in out
    assert "track: llama-cpp-python 0.3.37 is fetched and built by `quantkit run --track`; every node after the " \
           "source is to do with it" in out
    assert "not built yet" not in out
    assert not (Path(package_index).parent / "cache").exists()  # nothing fetched, nothing built


def test_a_tracking_run_pins_the_new_release_by_its_bytes_and_builds_it_in_its_own_folder(project, package_index,
                                                                                          toolchain):
    """``run --track`` up to the build: the re-pinned recipe names the release and its sdist's sha256, the
    patch proposes both, and the run's toolchain is looked for in the release's own cache folder (building
    the real llama.cpp there takes 4 to 13 minutes on 2 cores, README: not in the suite)."""
    import hashlib

    from quantkit.errors import ToolchainError
    from quantkit.toolchain import recipe_toolchain, release_dir
    from quantkit.tracking import prepare, record_for

    text = BASE.format(rev=C1, track="", toolchain="toolchain:\n  track: latest   # the nightly's llama.cpp\n")
    path = write(project, text)
    tracked = prepare(path)
    sha = hashlib.sha256((package_index / "llama_cpp_python-0.3.37.tar.gz").read_bytes()).hexdigest()
    assert tracked.recipe_file == project / "runs" / "tracked.tracked" / "recipe.yaml"
    assert tracked.resolution.lines() == [
        "toolchain: newest llama-cpp-python for 'latest' is 0.3.37; the recipe builds with 0.3.36: changed "
        f"(llama.cpp 5e6f7a8, sdist sha256 {sha[:12]})"]
    assert tracked.recipe_file.read_text() == text + f"  version: 0.3.37\n  sdist_sha256: {sha}\n"
    record = record_for(tracked.recipe_file)
    assert record["recipe"] == "recipes/r.yaml" and f"+  sdist_sha256: {sha}\n" in record["patch"]
    # The next night finds the release fetched already: no second download.
    (package_index / "llama_cpp_python-0.3.37.tar.gz").rename(package_index.parent / "gone.tar.gz")
    fake_release(package_index, "0.3.37", "999999999", {"convert_hf_to_gguf.py": b"# never downloaded\n"})
    assert prepare(path).resolution.sdist_sha256 == sha
    pinned = load_recipe(tracked.recipe_file)
    with pytest.raises(ToolchainError, match=f"llama-cpp-python 0.3.37 is not built in {release_dir('0.3.37', False)}"):
        recipe_toolchain(pinned.toolchain, build=False)
    assert record_for(path) is None  # the recipe itself is not a tracking run's copy
    # With no newer release, the recipe runs as it is: nothing written.
    path = write(project, BASE.format(rev=C1, track="", toolchain="toolchain: {track: '<0.3.37'}\n"))
    again = prepare(path)
    assert again.recipe_file == path.resolve() and not again.resolution.changed


def test_a_tracking_record_that_is_not_the_runs_own_is_refused(project, package_index):
    from quantkit.tracking import TrackingError, prepare, record_for

    tracked = prepare(write(project, BASE.format(rev=C1, track="", toolchain="toolchain: {track: latest}\n")))
    record = tracked.recipe_file.parent / "tracking.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "recipe": "../../etc/x.yaml"}))
    with pytest.raises(TrackingError, match="does not belong to"):
        record_for(tracked.recipe_file)
    record.write_text(json.dumps(data))
    assert record_for(tracked.recipe_file)["recipe"] == "recipes/r.yaml"
    tracked.recipe_file.write_text(tracked.recipe_file.read_text() + "# edited after the run was prepared\n")
    with pytest.raises(TrackingError, match="does not belong to"):
        record_for(tracked.recipe_file)


def test_a_release_of_the_bindings_only_uses_the_pinned_build_and_another_commit_is_checked(tmp_path, monkeypatch,
                                                                                            toolchain):
    """A release that vendors the pinned llama.cpp (same commit, same converter) gets the pinned build's
    real binaries in its own folder, and reports its own release; binaries of another commit in a release's
    folder are refused."""
    import hashlib

    from quantkit.errors import ToolchainError
    from quantkit.toolchain import ensure_release_toolchain, find_release_toolchain, release_dir

    index = tmp_path / "index"
    index.mkdir()
    same = fake_release(index, "0.3.37", "0c1e57098", {"convert_hf_to_gguf.py": (toolchain.src / "convert_hf_to_gguf.py")
                                                      .read_bytes()})
    other = fake_release(index, "0.3.38", "5e6f7a8b9", {"convert_hf_to_gguf.py": b"# another tree\n"})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QUANTKIT_LLAMA_CPP_BIN", str(toolchain.bin_dir))  # the pinned build, where it is
    monkeypatch.setenv("QUANTKIT_LLAMA_CPP_SRC", str(toolchain.src))
    sha = hashlib.sha256(same.read_bytes()).hexdigest()
    tc = ensure_release_toolchain("0.3.37", sha, cuda=False)
    assert tc.bin_dir == release_dir("0.3.37", False) / "bin" and tc.commit == "0c1e570"
    assert tc.version == "llama.cpp 0c1e570 (llama-cpp-python 0.3.37)"
    assert (tc.bin_dir / "llama-quantize").stat().st_size == toolchain.binary("llama-quantize").stat().st_size
    assert find_release_toolchain("0.3.37", sha, cuda=False) == tc  # found again without fetching
    with pytest.raises(ToolchainError, match="is not built"):
        find_release_toolchain("0.3.37", "0" * 64, cuda=False)  # another sdist under the same version
    # 0.3.38 vendors another commit: its folder holding the pinned binaries is not its toolchain.
    from quantkit.toolchain import STAMP, fetch_release

    folder = release_dir("0.3.38", False)
    folder.mkdir(parents=True)
    fetch_release("0.3.38", folder)
    shutil.copytree(tc.bin_dir, folder / "bin")
    (folder / STAMP).write_text("{}")
    with pytest.raises(ToolchainError, match="does not hold llama.cpp 5e6f7a8 of llama-cpp-python 0.3.38"):
        find_release_toolchain("0.3.38", hashlib.sha256(other.read_bytes()).hexdigest(), cuda=False)


def test_tracking_offline_is_one_line_and_writes_nothing(project, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = write(project, BASE.format(rev=C1, track="  track: main\n", toolchain=""))
    assert main(["run", "--track", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model.track 'main' needs the Hub, and HF_HUB_OFFLINE is set\n")
    assert not (project / "runs").exists() and not (project / "store").exists()
    assert main(["run", "--track", str(write(project, BASE.format(rev=C1, track="", toolchain="")))]) == 1
    assert "tracks nothing: add model.track or toolchain.track" in capsys.readouterr().err


def test_plan_track_uses_a_newer_release_an_earlier_tracking_run_built(project, tmp_path, monkeypatch, capsys,
                                                                       toolchain, tiny_llama):
    """Once a tracking run has fetched and built the newer release, ``plan --track`` says so and plans with
    its build: a node whose store entry exists under the keys that build gives shows as done. (A release of
    the bindings only, linked to the pinned build, keeps it cheap; tests/test_nightly.py plans with a release
    of another llama.cpp commit, built.)"""
    import hashlib

    from quantkit.toolchain import release_dir

    shutil.copytree(tiny_llama, project / "models" / "tiny")
    index = tmp_path / "index"
    index.mkdir()
    tree = {p.relative_to(toolchain.src).as_posix(): p.read_bytes()  # what the converter runs with
            for p in [toolchain.convert_script, *(toolchain.src / "conversion").rglob("*"),
                      *(toolchain.src / "gguf-py").rglob("*")] if p.is_file()}
    sha = hashlib.sha256(fake_release(index, "0.3.37", "0c1e57098", tree).read_bytes()).hexdigest()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QUANTKIT_LLAMA_CPP_BIN", str(toolchain.bin_dir))  # the pinned build, where it is
    monkeypatch.setenv("QUANTKIT_LLAMA_CPP_SRC", str(toolchain.src))
    path = write(project, "name: tracked\nmodel:\n  path: models/tiny\n  name: tiny-llama\ncalibration:\n"
                          "  files: [calibration/calib.txt]\ngguf:\n  imatrix: {enabled: false}\n  types: [Q8_0]\n"
                          "toolchain:\n  track: latest\n")

    def plan() -> tuple[str, dict[str, str]]:
        assert main(["plan", "--track", str(path)]) == 0
        out = capsys.readouterr().out
        return out, {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["convert"],
                                                                                                 ["quantize:Q8_0"])}

    out, rows = plan()  # nothing fetched yet: every node after the source is to do
    assert "changed (fetched and built by the run, in its own cache folder)" in out
    assert "every node after the source is to do" in out and "the toolchain is not built" in rows["convert"]

    assert main(["run", "--track", "--until", "convert", str(path)]) == 0
    assert "built: convert\n" in capsys.readouterr().out
    folder = release_dir("0.3.37", False)
    out, rows = plan()
    assert (f"track: toolchain: newest llama-cpp-python for 'latest' is 0.3.37; the recipe builds with 0.3.36: "
            f"changed (llama.cpp 0c1e570, sdist sha256 {sha[:12]}; built in {folder})") in out
    assert "every node after the source is to do" not in out and "not built yet" not in out
    assert rows["convert"].split()[1] == "done" and "in the store (convert/" in rows["convert"]
    assert rows["quantize:Q8_0"].split()[1:3] == ["to", "do"] and "not in the store" in rows["quantize:Q8_0"]
