"""Vision projectors (issue #28): a vision-language model's ``mmproj-<name>-f16.gguf`` (and q8_0) converted by
the pinned converter, served with each GGUF (an image goes into the prompt), published beside the GGUFs
where ``llama-server -hf`` finds it. The model is tests/tinyvlm.py: SmolVLM's layout, the trained tiny Llama
as its language model, a random 1-layer SigLIP."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import time
import urllib.request

import pytest
from localhub import LocalHub
from tinyllama import source_digest
from tinyvlm import build_tiny_vlm

from quantkit.errors import RecipeError
from quantkit.graph import build_graph
from quantkit.mmproj import converter_architectures, vision_architecture
from quantkit.publish.hublayout import llama_cpp_projector
from quantkit.recipe import load_recipe

TOKEN = "hf_PlantedMmproj0123456789abcdefXYZ42"  # llama.cpp sends one of 37 characters or more
OWNER = "me"

RECIPE = """\
name: tiny-vlm
model:
  path: models/vlm
  name: tiny-vlm{mmproj}
calibration:
  files: [calibration/en-prose.txt]
gguf:
  base_type: f16
  imatrix: {{enabled: false}}
  types: [Q8_0, Q6_K]
serve: {{max_tokens: 24}}
"""


@pytest.fixture(scope="session")
def tiny_vlm(tiny_llama) -> pathlib.Path:
    """The tiny VLM's checkpoint, cached like the tiny Llama (keyed by its builders' sources)."""
    cache = pathlib.Path(os.environ.get("QUANTKIT_TEST_CACHE", pathlib.Path.home() / ".cache" / "quantkit-tests"))
    digest = hashlib.sha256((source_digest() + "".join((pathlib.Path(__file__).parent / f).read_text()
                                                       for f in ("tinyvlm.py", "chatstop.py"))).encode()).hexdigest()[:16]
    dest = cache / f"tiny-vlm-{digest}"
    if not (dest / "config.json").exists():
        build_tiny_vlm(dest, text_model=tiny_llama)
    return dest


def _project(root: pathlib.Path, repo_root: pathlib.Path, vlm: pathlib.Path, mmproj: str = "") -> pathlib.Path:
    (root / "recipes").mkdir(parents=True)
    (root / "calibration").mkdir()
    shutil.copy2(repo_root / "calibration" / "en-prose.txt", root / "calibration" / "en-prose.txt")
    shutil.copytree(vlm, root / "models" / "vlm")
    recipe = root / "recipes" / "vlm.yaml"
    recipe.write_text(RECIPE.format(mmproj=mmproj))
    return recipe


# --- deciding whether a model has a projector --------------------------------------------------------------

def test_the_pinned_converter_makes_projectors_of_the_tiny_vlm_family(toolchain, tiny_vlm):
    config = json.loads((tiny_vlm / "config.json").read_text())
    arch = vision_architecture(config)
    assert arch == "Idefics3ForConditionalGeneration" and arch in converter_architectures(toolchain.src)
    assert "LlamaForCausalLM" not in converter_architectures(toolchain.src)  # text models have no --mmproj class
    assert vision_architecture({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}) is None


def test_a_local_vlm_gets_the_projector_node_and_can_opt_out(tiny_vlm, repo_root, tmp_path):
    recipe = load_recipe(_project(tmp_path / "a", repo_root, tiny_vlm))
    assert recipe.model.mmproj is True  # decided from config.json's vision_config
    nodes = {n.name: n for n in build_graph(recipe)}
    assert nodes["mmproj"].needs == ("source",) and "mmproj" in nodes["run-folder"].needs
    assert nodes["serve-gguf:Q6_K"].needs == ("quantize:Q6_K", "source", "mmproj")
    off = load_recipe(_project(tmp_path / "b", repo_root, tiny_vlm, "\n  mmproj: false"))
    assert off.model.mmproj is False and "mmproj" not in {n.name for n in build_graph(off)}


def test_a_text_model_has_no_projector_and_true_is_refused_on_its_line(tiny_llama, repo_root, tmp_path):
    recipe = load_recipe(_project(tmp_path / "a", repo_root, tiny_llama))
    assert recipe.model.mmproj is False and "mmproj" not in {n.name for n in build_graph(recipe)}
    with pytest.raises(RecipeError) as e:
        load_recipe(_project(tmp_path / "b", repo_root, tiny_llama, "\n  mmproj: true"))
    assert str(e.value.problems[0]).startswith("recipes/vlm.yaml:5: model.mmproj: model.mmproj is true but "
                                               "models/vlm/config.json has no vision_config")
    with pytest.raises(RecipeError) as e:  # strict schema: a typo is not a boolean
        load_recipe(_project(tmp_path / "c", repo_root, tiny_llama, "\n  mmproj: sometimes"))
    assert e.value.problems[0].line == 5 and e.value.problems[0].where == "model.mmproj"


@pytest.mark.parametrize("fmt, section", [("gptq", "gptq:\n  - {bits: 4}\n"), ("awq", "awq:\n  - {w_bit: 4}\n")])
def test_gptq_or_awq_of_a_vlm_is_refused_with_the_reason(fmt, section, tiny_vlm, repo_root, tmp_path):
    recipe = _project(tmp_path, repo_root, tiny_vlm)
    recipe.write_text(recipe.read_text() + section)
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    (p,) = e.value.problems
    assert (p.line, p.where) == (12, fmt) and p.message.startswith(f"{fmt} of a vision-language model is not supported")
    assert "checkpoint would lack the vision tower" in p.message
    recipe.write_text(recipe.read_text().replace("\n  name: tiny-vlm\n", "\n  name: tiny-vlm\n  mmproj: false\n"))
    with pytest.raises(RecipeError) as e:  # without the projector the checkpoint is still a VLM missing its tower
        load_recipe(recipe)
    assert [p.where for p in e.value.problems] == [fmt]


def test_gptq_and_awq_of_a_hub_vlm_are_refused_when_the_recipe_says_mmproj(repo_root, tmp_path):
    """A Hub model's config.json is unknown at load time: ``model.mmproj: true`` is what says it is a VLM."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "calibration").mkdir()
    shutil.copy2(repo_root / "calibration" / "en-prose.txt", tmp_path / "calibration" / "en-prose.txt")
    recipe = tmp_path / "recipes" / "hub.yaml"
    recipe.write_text("name: hub-vlm\nmodel: {repo: o/m, revision: %s, mmproj: true}\n"
                      "calibration: {files: [calibration/en-prose.txt]}\ngguf: {types: [Q8_0]}\n"
                      "gptq: [{bits: 4}]\nawq: [{w_bit: 4}]\n" % ("a" * 40))
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, root=tmp_path)
    assert [(p.line, p.where) for p in e.value.problems] == [(5, "gptq"), (6, "awq")]


def test_a_hub_vlm_must_say_whether_its_projector_is_published(tiny_vlm, tiny_llama):
    """A Hub model's config.json is not known when the recipe is loaded: the graph has no mmproj node unless the
    recipe asks, and the source node stops a run of a VLM whose recipe does not say."""
    from quantkit.mmproj import ProjectorError, check_decided
    from quantkit.recipe import Recipe
    from quantkit.source import ModelSnapshot

    hub = Recipe.model_validate({"name": "x", "model": {"repo": "o/m", "revision": "a" * 40},
                                 "calibration": {"files": ["calibration/c.txt"]}, "gguf": {"types": ["Q4_K_M"]}})
    assert hub.model.mmproj is None and "mmproj" not in {n.name for n in build_graph(hub)}
    asked = hub.model_copy(update={"model": hub.model.model_copy(update={"mmproj": True})})
    assert "mmproj" in {n.name for n in build_graph(asked)}

    def snapshot(path):
        return ModelSnapshot(repo="o/m", revision="a" * 40, commit="a" * 40, path=path, digest="d", files={})

    check_decided(snapshot(tiny_llama))  # a text model: nothing to decide
    with pytest.raises(ProjectorError, match=r"o/m is a vision-language model \(Idefics3ForConditionalGeneration\): "
                                             "set model.mmproj: true"):
        check_decided(snapshot(tiny_vlm))


def test_llama_cpp_picks_the_projector_with_the_closest_bits():
    paths = ["M-F16.gguf", "M-Q4_K_M.gguf", "mmproj-M-F16.gguf", "mmproj-M-Q8_0.gguf", "sub/M-Q2_K.gguf",
             "sub/mmproj-M-F16.gguf", "other/mmproj-M-Q8_0.gguf"]
    assert llama_cpp_projector(paths, "M-Q4_K_M.gguf", "Q4_K_M") == "mmproj-M-Q8_0.gguf"
    assert llama_cpp_projector(paths, "M-F16.gguf", "F16") == "mmproj-M-F16.gguf"
    assert llama_cpp_projector(paths, "sub/M-Q2_K.gguf") == "sub/mmproj-M-F16.gguf"  # its own folder first
    assert llama_cpp_projector(["M-Q4_K_M.gguf"], "M-Q4_K_M.gguf") is None


def test_projector_names_are_lower_case_and_llama_cpp_still_picks_them():
    """quantkit writes ``mmproj-<name>-f16.gguf`` / ``-q8_0`` (bartowski's spelling): llama.cpp reads the bit count
    case-insensitively, so ``-hf`` still pairs Q8_0 with a quantized GGUF and F16 with the F16 one."""
    from quantkit.mmproj import TYPES, file_name

    names = [file_name("M", t) for t in TYPES]
    assert names == ["mmproj-M-f16.gguf", "mmproj-M-q8_0.gguf"]
    paths = ["M-F16.gguf", "M-Q4_K_M.gguf", *names]
    assert llama_cpp_projector(paths, "M-Q4_K_M.gguf") == "mmproj-M-q8_0.gguf"
    assert llama_cpp_projector(paths, "M-F16.gguf") == "mmproj-M-f16.gguf"
    assert llama_cpp_projector(paths, "M-Q4_K_M.gguf", "Q4_K_M") == "mmproj-M-q8_0.gguf"


def test_the_plan_prices_the_projector_from_the_vision_weights(tiny_vlm, repo_root, tmp_path, monkeypatch):
    """`quantkit plan`'s mmproj row: two files, F16 and Q8_0, of the vision tensors in the safetensors header;
    biases, norms and the SigLIP embeddings stay F32 in both (the converter's rules), the other matrices take
    2 bytes and 34/32 bytes a weight. The slow run below checks the figure against the files the converter wrote."""
    from quantkit.context import RunContext
    from quantkit.estimate import VISION_PARTS, read_local_facts
    from quantkit.plan import plan, render

    recipe = _project(tmp_path, repo_root, tiny_vlm)
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("QUANTKIT_PROJECT", str(tmp_path))
    rows = {r.name: r for r in plan(RunContext.from_env(recipe, toolchain="find"))}
    vision = [t for t in read_local_facts(tiny_vlm).tensors if any(k in t.name for k in VISION_PARTS)]
    f32 = sum(t.count for t in vision if len(t.shape) == 1 or ".embeddings." in t.name)
    matrices = [t for t in vision if len(t.shape) == 2 and ".embeddings." not in t.name]
    assert len(vision) == 22 and all(t.shape[-1] % 32 == 0 for t in matrices)
    weights = sum(t.count for t in matrices)
    assert f32 + weights == sum(t.count for t in vision) == 149_376
    data = 2 * 4 * f32 + 2 * weights + weights * 34 // 32  # both files
    # beyond the tensor data only the two headers and the 32-byte alignment of each tensor
    assert data < rows["mmproj"].disk_bytes < data + 2 * (4096 + 22 * 96)
    line = next(ln for ln in render(list(rows.values())).splitlines() if ln.startswith("mmproj "))
    assert f"{rows['mmproj'].disk_bytes / 1024:.0f} KiB" in line


# --- the whole run -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_vlm_runs_its_ladder_and_publishes_the_projector_that_llama_server_finds(
        tiny_vlm, toolchain, repo_root, tmp_path, capsys, monkeypatch):
    """`quantkit run` on the tiny VLM: the GGUF ladder as for a text model plus the mmproj node (F16 and Q8_0,
    content-addressed in the store), each GGUF served with its projector and shown an image, the projector in
    the run folder, manifest, report, card and Modelfiles; then pushed to the local Hub, where
    ``llama-server -hf me/tiny-vlm-GGUF:Q6_K`` downloads the GGUF and the Q8_0 projector beside it and
    answers a chat with an image."""
    import huggingface_hub.constants as c
    from huggingface_hub import HfApi

    from quantkit.cli import main
    from quantkit.publish import release as pub
    from quantkit.recipe import Publish

    root = tmp_path / "proj"
    recipe = _project(root, repo_root, tiny_vlm)
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    monkeypatch.chdir(root)
    assert main(["plan", str(recipe)]) == 0
    assert "mmproj" in capsys.readouterr().out
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "mmproj" in out, out
    run = root / "runs" / "tiny-vlm"
    manifest = json.loads((run / "manifest.json").read_text())
    projectors = {p["type"]: p for p in manifest["projectors"]}
    assert set(projectors) == {"F16", "Q8_0"}
    for t, p in projectors.items():
        assert p["file"] == f"mmproj-tiny-vlm-{t.lower()}.gguf" and p["projector_type"] == "idefics3"
        f = run / p["file"]
        assert f.stat().st_size == p["size"] and hashlib.sha256(f.read_bytes()).hexdigest() == p["sha256"]
    assert projectors["Q8_0"]["size"] < projectors["F16"]["size"]
    from quantkit.estimate import mmproj_file_bytes, read_local_facts

    facts = read_local_facts(root / "models" / "vlm")
    for t, p in projectors.items():  # the plan's figure against the converter's file (measured: 0.3 % over)
        assert p["size"] <= mmproj_file_bytes(facts, t) <= p["size"] * 1.02, (t, p["size"])
    store_entry = tmp_path / "store" / "mmproj" / projectors["F16"]["key"]
    assert (store_entry / "mmproj-F16.gguf").samefile(run / "mmproj-tiny-vlm-f16.gguf")  # linked, not copied
    assert {v["label"] for v in manifest["variants"]} == {"F16", "Q8_0", "Q6_K"}  # the ladder as usual

    report = json.loads((run / "report" / "report.json").read_text())
    serving = {r["id"]: r["serving"] for r in report["variants"]}
    assert {vid: s["image"] for vid, s in serving.items()} == {"gguf:F16": "yes", "gguf:Q8_0": "yes",
                                                               "gguf:Q6_K": "yes"}, serving
    latest = root / "artifacts" / "tiny-vlm" / "latest"
    assert (latest / "mmproj-tiny-vlm-f16.gguf").is_file() and (latest / "mmproj-tiny-vlm-q8_0.gguf").is_file()
    card = (latest / "README.md").read_text()
    assert "## Vision projector" in card and f"`{projectors['F16']['sha256']}`" in card
    assert "--mmproj mmproj-tiny-vlm-f16.gguf" in (latest / "report.md").read_text()
    modelfiles = list(latest.glob("*.Modelfile"))
    assert modelfiles and all('FROM "./mmproj-tiny-vlm-f16.gguf"' in m.read_text() for m in modelfiles)

    # Rerun: everything reused, the projector too.
    assert main(["run", str(recipe)]) == 0
    assert "mmproj" in capsys.readouterr().out

    # The GGUF repo on the local Hub, and what llama-server -hf makes of it.
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    published = json.loads((latest / "manifest.json").read_text())
    shown = json.loads((latest / "report.json").read_text())
    with LocalHub(token=TOKEN) as hub:
        urls = pub.publish_hub_repos(staged=latest, manifest=published, report=shown,
                                     settings=Publish(target="hub", owner=OWNER), run_id="r1", recipe="tiny-vlm",
                                     recipe_yaml=recipe.read_text(), api=HfApi(endpoint=hub.url, token=TOKEN))
        (repo,) = urls
        files = hub.tree(repo, "r1")
        assert {"mmproj-tiny-vlm-f16.gguf", "mmproj-tiny-vlm-q8_0.gguf"} <= set(files)
        assert "## Vision projector" in files["README.md"].decode()
        reply, got = _chat_with_image_from_the_hub(toolchain, hub, repo, tmp_path)
    fetched = sorted(p.rsplit("/", 1)[1] for p in got)
    assert fetched == ["mmproj-tiny-vlm-q8_0.gguf", "tiny-vlm-Q6_K.gguf"], got  # the closest bits: Q8_0, not F16
    assert llama_cpp_projector(sorted(files), "tiny-vlm-Q6_K.gguf", "Q6_K") == "mmproj-tiny-vlm-q8_0.gguf"
    assert reply["usage"]["prompt_tokens"] > 20 and reply["choices"][0]["message"]["content"] is not None


def _chat_with_image_from_the_hub(toolchain, hub, repo, tmp_path) -> tuple[dict, list[str]]:
    """``llama-server -hf repo:Q6_K`` against the local Hub (pinned llama.cpp's own download code), then a
    chat with the sample image; returns the reply and the paths the server downloaded."""
    from quantkit.serving import sample_image
    from quantkit.serving.llamaserver import free_port, stop

    port = free_port()
    env = {**os.environ, "HF_ENDPOINT": hub.url, "MODEL_ENDPOINT": hub.url + "/", "HF_TOKEN": TOKEN,
           "LLAMA_CACHE": str(tmp_path / "llama-cache")}
    env.pop("HF_HUB_OFFLINE", None)
    log = tmp_path / "hf-server.log"
    with open(log, "wb") as out:
        # --no-repack: on an AMX Xeon the pinned llama-server dies (SIGILL) loading a repacked Q6_K or Q8_0 file;
        # quantkit's own serve check starts it again so (quantkit.serving.llamaserver.running_server)
        proc = subprocess.Popen([toolchain.binary("llama-server"), "-hf", f"{repo}:Q6_K", "--port", str(port),
                                 "--host", "127.0.0.1", "-c", "512", "-t", "2", "--jinja", "--no-repack"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        picture = "data:image/png;base64," + base64.b64encode(sample_image()).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe the image."},
                                                          {"type": "image_url", "image_url": {"url": picture}}]}],
                "max_tokens": 4}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
    finally:
        stop(proc)
    got = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert "loaded multimodal model" in log.read_text(), log.read_text()[-3000:]
    return reply, got


# --- the projector as a published file ---------------------------------------------------------------------

def test_a_damaged_or_changed_projector_is_caught_like_a_gguf(tmp_path):
    """The manifest's projectors are checked as its GGUFs are (size, sha256) before publishing, and a new
    projector makes a new release (the fingerprint covers it; a text model's fingerprint is as it was)."""
    from quantkit.publish.release import release_fingerprint
    from quantkit.manifest import damaged_files

    good = b"projector bytes"
    (tmp_path / "mmproj-M-F16.gguf").write_bytes(good)
    p = {"file": "mmproj-M-F16.gguf", "type": "F16", "step": "mmproj", "key": "k" * 32, "size": len(good),
         "sha256": hashlib.sha256(good).hexdigest()}
    manifest = {"schema": 2, "quantkit": "0", "recipe": {}, "model": {}, "calibration": {}, "variants": [],
                "projectors": [p]}
    assert damaged_files(tmp_path, manifest, digests=True) == []
    (tmp_path / "mmproj-M-F16.gguf").write_bytes(b"projector bytez")  # same size, other bytes
    ((where, why),) = damaged_files(tmp_path, manifest, digests=True)
    assert where.to_dict() == p and why.startswith(f"{tmp_path.name}/mmproj-M-F16.gguf: ")
    assert damaged_files(tmp_path, manifest) == []  # the size alone cannot tell
    text = {"schema": 2, "variants": [{"format": "gguf", "label": "F16", "file": "M-F16.gguf", "files": {}, "scores": {}}]}
    with_projector = {**text, "projectors": [p]}
    changed = {**text, "projectors": [{**p, "sha256": "0" * 64}]}
    assert len({release_fingerprint(m) for m in (text, with_projector, changed)}) == 3
    assert release_fingerprint(text) == release_fingerprint({**text, "projectors": []})
