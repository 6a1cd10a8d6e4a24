"""One Hub repo per format, pushed through huggingface_hub's own client to the local Hub (localhub.py),
then read back as a user would: ``hf_hub_download`` by the names people type, ``AutoConfig`` from the
GPTQ repo's root, and llama.cpp's quant-tag rule over the repo's listing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pydantic
import pytest
from huggingface_hub import ModelCard
from localhub import LocalHub
from test_report import CHATML, CONFIG, RECIPE_YAML, STEM, _variant, make_manifest, make_run_dir

from quantkit.errors import PublishError, RecipeError
from quantkit.publish import release as pub
from quantkit.publish.hublayout import gguf_commands, hub_tag_files, llama_cpp_pick, plan_repos
from quantkit.recipe import Publish, Recipe, load_recipe

TOKEN = "hf_PlantedHubLayout0123456789abcdefXYZ"
OWNER = "me"
GGUF_REPO, AWQ_REPO = f"{OWNER}/{STEM}-GGUF", f"{OWNER}/{STEM}-AWQ"
GPTQ4, GPTQ8 = f"{OWNER}/{STEM}-GPTQ-4bit-g128", f"{OWNER}/{STEM}-GPTQ-8bit-g64"
QCONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}
LLAMA_CONFIG = {**CONFIG, "model_type": "llama", "intermediate_size": 1536, "torch_dtype": "float16"}
RECIPE_BASE = {"name": "x", "model": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "a" * 40},
               "calibration": {"files": ["calibration/en-prose.txt"]}, "gguf": {"types": ["Q4_K_M"]},
               "gptq": [{"bits": 4, "group_size": 128}, {"bits": 4, "group_size": 64}], "awq": [{}]}


def hub_manifest() -> dict:
    """test_report's manifest with the resolved recipe the repo names come from, and a second GPTQ config."""
    m = make_manifest()
    m["variants"].insert(-1, _variant("gptq", "GPTQ-8bit-g64", f"{STEM}-GPTQ-8bit-g64", 200_000_000,
                                      {"ppl": 20.2, "kld_mean": 0.01, "tasks": {"arc_easy": 0.60}},
                                      "model.safetensors"))
    m["recipe"]["resolved"] |= {"gguf": {"types": [v["label"] for v in m["variants"][1:8]]},
                                "gptq": [{"bits": 4, "group_size": 128}, {"bits": 8, "group_size": 64}],
                                "awq": [{"w_bit": 4, "q_group_size": 128}]}
    return m


def hub_run_dir(tmp_path: Path, manifest: dict) -> Path:
    run = make_run_dir(tmp_path, manifest)
    for v in manifest["variants"]:
        if v["format"] in ("gptq", "awq"):
            folder = run / v["file"]
            bits = int(v["label"].split("-")[1].removesuffix("bit"))
            group = int(v["label"].split("-g")[1])
            method = {"gptq": "gptq", "awq": "awq"}[v["format"]]
            (folder / "config.json").write_text(json.dumps(
                LLAMA_CONFIG | {"quantization_config": QCONFIG | {"quant_method": method, "bits": bits,
                                                                  "group_size": group}}))
            (folder / "tokenizer.json").write_text('{"version": "1.0"}')
            (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
            (folder / "README.md").write_text("GPTQModel's own readme: replaced by the repo's card")
    return run


# --- the recipe ----------------------------------------------------------------------------------------

def test_repo_templates_default_to_one_repo_per_format_and_config():
    r = Recipe.model_validate(RECIPE_BASE | {"publish": {"target": "hub", "owner": OWNER}})
    assert [(fmt, label, repo) for _, fmt, label, repo in r.publish.hub_repo_ids(r)] == [
        ("gguf", "Q4_K_M", GGUF_REPO), ("gptq", "GPTQ-4bit-g128", GPTQ4),
        ("gptq", "GPTQ-4bit-g64", f"{OWNER}/{STEM}-GPTQ-4bit-g64"), ("awq", "AWQ-4bit-g128", AWQ_REPO)]
    # the older form: repo is the GGUF repo, its owner owns the others
    old = Recipe.model_validate(RECIPE_BASE | {"publish": {"target": "hub", "repo": "org/my-gguf"}})
    assert [repo for *_, repo in old.publish.hub_repo_ids(old)][::3] == ["org/my-gguf", f"org/{STEM}-AWQ"]


@pytest.mark.parametrize(("publish", "message"), [
    ({"repos": {"gptq": "{owner}/{model}-GPTQ"}},
     f"gptq[0] and gptq[1] would both publish to {OWNER}/{STEM}-GPTQ"),
    ({"repos": {"awq": "{owner}/{model}-GGUF"}}, "gguf.types[0] and awq[0] would both publish to"),
    ({"repos": {"gptq": "{owner}/{model}-{size}"}}, "uses {size}, unknown for gptq repos"),
    ({"repos": {"gguf": "{owner}/{model}-{bits}bit"}}, "uses {bits}, unknown for gguf repos"),
    ({"repos": {"awq": "{owner}/{model} AWQ"}}, f"would be '{OWNER}/{STEM} AWQ', not a Hugging Face repo id"),
    ({"repos": {"awq": "{owner}/{model:>3}"}}, "is not a plain name"),
    ({"repos": {"awq": "{owner}/{model}-{"}}, "is not a valid repo template"),
    ({"owner": "me/you"}, "is not a Hugging Face user or organisation name"),
    ({"owner": None, "repo": "me/x", "repos": {"gguf": "{owner}/x"}}, "publish.repo and publish.repos.gguf"),
])
def test_repo_templates_are_checked(publish, message):
    with pytest.raises(pydantic.ValidationError, match=re.escape(message)):
        Recipe.model_validate(RECIPE_BASE | {"publish": {"target": "hub", "owner": OWNER} | publish})


def test_a_shared_repo_is_reported_on_its_line(tmp_path):
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "en-prose.txt").write_text("text")
    (tmp_path / "r.yaml").write_text(textwrap.dedent("""\
        name: x
        model: {repo: HuggingFaceTB/SmolLM2-135M-Instruct, revision: v1}
        calibration: {files: [calibration/en-prose.txt]}
        gptq: [{bits: 4, group_size: 128}, {bits: 4, group_size: 64}]
        publish:
          target: hub
          owner: me
          repos:
            gptq: "{owner}/{model}-GPTQ-{bits}bit"
        """))
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml", root=tmp_path)
    assert str(e.value.problems[0]) == (
        f"r.yaml:9: publish.repos.gptq: gptq[0] and gptq[1] would both publish to me/{STEM}-GPTQ-4bit "
        "(fix: add {bits} and {group} to publish.repos.gptq, or drop one of them)")


# --- layout and quant tags -----------------------------------------------------------------------------

def test_quant_tags_resolve_as_llama_cpp_and_the_hub_resolve_them():
    names = sorted(["M-Q4_K_M.gguf", "M-Q4_K_M-noimat.gguf", "M-IQ4_XS.gguf", "M-Q8_0-00001-of-00002.gguf",
                    "M-Q8_0-00002-of-00002.gguf", "M-imatrix-Q4_K_M.gguf", "README.md"])
    # llama.cpp: first '<tag>[.-]' match in listing order; '-' sorts before '.', so the noimat file wins
    assert llama_cpp_pick(names, "Q4_K_M") == ["M-Q4_K_M-noimat.gguf"]
    assert llama_cpp_pick(names, "q8_0") == ["M-Q8_0-00001-of-00002.gguf", "M-Q8_0-00002-of-00002.gguf"]
    assert llama_cpp_pick(names, "Q4_XS") == ["M-IQ4_XS.gguf"]  # a substring match, as llama.cpp does
    assert hub_tag_files(names, "Q4_K_M") == ["M-Q4_K_M.gguf"]
    assert hub_tag_files(names, "Q4_K_M-noimat") == ["M-Q4_K_M-noimat.gguf"]
    repo = pub.HubRepo("gguf", "me/M-GGUF", (), ggufs={"Q4_K_M": "M-Q4_K_M.gguf", "Q4_K_M-noimat":
                                                     "M-Q4_K_M-noimat.gguf", "Q8_0": "M-Q8_0.gguf"})
    cmds = gguf_commands(repo, names)
    assert cmds["Q4_K_M"] == {"ollama": "ollama run hf.co/me/M-GGUF:Q4_K_M",
                              "llama_server": "llama-server --hf-repo me/M-GGUF --hf-file M-Q4_K_M.gguf"}
    assert cmds["Q4_K_M-noimat"]["llama_server"] == "llama-server -hf me/M-GGUF:Q4_K_M-noimat"
    # shards: Ollama cannot import them, so the merge line instead of `ollama run`
    assert cmds["Q8_0"] == {"merge": "llama-gguf-split --merge M-Q8_0-00001-of-00002.gguf M-Q8_0.gguf",
                            "llama_server": "llama-server -hf me/M-GGUF:Q8_0"}


def test_layout_puts_each_checkpoint_at_a_repo_root(tmp_path):
    manifest = hub_manifest()
    run = hub_run_dir(tmp_path, manifest)
    repos = plan_repos(staged=run, manifest=manifest, settings=Publish(target="hub", owner=OWNER))
    assert [(r.format, r.repo_id) for r in repos] == [("gguf", GGUF_REPO), ("gptq", GPTQ4), ("gptq", GPTQ8),
                                                      ("awq", AWQ_REPO)]
    gguf, gptq4 = repos[0], repos[1]
    assert f"{STEM}-Q4_K_M.gguf" in gguf.files and f"{STEM}-F16.gguf" in gguf.files
    assert not any("/" in name or name.startswith("config") for name in gguf.files)
    assert sorted(gptq4.files) == ["config.json", "manifest.json", "model.safetensors", "recipe.yaml",
                                   "tokenizer.json", "tokenizer_config.json"]  # the checkpoint's README is not
    assert gptq4.settings == {"GPTQ-4bit-g128": {"bits": 4, "group_size": 128, "desc_act": True, "group_aware": False,
                                                 "sym": True,
                                                 "damp_percent": 0.1, "samples": 128, "seq_len": 512, "seed": 0}}
    (run / f"{STEM}-GPTQ-4bit-g128" / "config.json").unlink()
    with pytest.raises(PublishError, match="has no config.json; from_pretrained and vLLM could not load it"):
        plan_repos(staged=run, manifest=manifest, settings=Publish(target="hub", owner=OWNER))


# --- against the local Hub --------------------------------------------------------------------------------

PUBLISH = """\
import json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # every line the libraries log, to grep
logging.getLogger("matplotlib").setLevel(logging.WARNING)
from quantkit.publish.release import release
from quantkit.recipe import Publish
a = json.loads(sys.argv[1])
run = Path(a["run"])
p = release(run_dir=run, manifest=json.loads((run / "manifest.json").read_text()), root=Path(a["root"]),
            settings=Publish.model_validate(a["publish"]), recipe_yaml=a["recipe_yaml"], config=a["config"],
            chat_template=a["chat_template"], run_id=a["run_id"])
print(json.dumps({"path": str(p.path), "hub_commit": p.hub_commit, "hub_commits": p.hub_commits}))
"""

USER = """\
import json, sys
from huggingface_hub import hf_hub_download
from transformers import AutoConfig
a = json.loads(sys.argv[1])
out = {"gguf": hf_hub_download(a["gguf_repo"], a["gguf_file"], revision=a["tag"]),
       "gptq_config": hf_hub_download(a["gptq_repo"], "config.json", revision=a["tag"])}
config = AutoConfig.from_pretrained(a["gptq_repo"], revision=a["tag"])
out["model_type"] = config.model_type
out["quantization_config"] = config.quantization_config
print(json.dumps(out))
"""


def _env(tmp_path: Path, hub: LocalHub) -> dict:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        env.pop(key, None)
    return env


def _python(script: str, args: dict, env: dict, cwd: Path) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], check=False, env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("hub-layout")
    manifest = hub_manifest()
    run = hub_run_dir(tmp_path, manifest)
    with LocalHub(token=TOKEN) as hub:
        args = {"run": str(run), "root": str(tmp_path), "publish": {"target": "hub", "owner": OWNER},
                "recipe_yaml": RECIPE_YAML, "config": CONFIG, "chat_template": CHATML, "run_id": "r1"}
        result, log = _python(PUBLISH, args, _env(tmp_path, hub), Path(__file__).parent)
        user, user_log = _python(USER, {"gguf_repo": GGUF_REPO, "gguf_file": f"{STEM}-Q4_K_M.gguf",
                                        "gptq_repo": GPTQ4, "tag": "r1"}, _env(tmp_path, hub), tmp_path)
        yield {"hub": hub, "result": result, "log": log + user_log, "user": user, "tmp": tmp_path, "run": run}


def test_one_repo_per_format_one_commit_each_tagged_with_the_run(published):
    hub, result = published["hub"], published["result"]
    assert sorted(hub.repos) == sorted([GGUF_REPO, GPTQ4, GPTQ8, AWQ_REPO])
    assert result["hub_commits"].keys() == set(hub.repos) and result["hub_commit"] == result["hub_commits"][GGUF_REPO]
    for repo_id, repo in hub.repos.items():
        assert repo.private
        head = repo.branches["main"]
        assert repo.tags == {"r1": head}, repo_id
        assert repo.messages[head][0] == "quantkit: smollm2-135m-demo run r1"
        assert len(repo.commits) == 2  # the Hub's initial .gitattributes commit, then the run's one commit
        assert result["hub_commits"][repo_id].endswith(f"/{repo_id}/commit/{head}")
    gguf = hub.tree(GGUF_REPO, "r1")
    assert {f"{STEM}-Q4_K_M.gguf", f"{STEM}-Q4_K_M.Modelfile", f"{STEM}-F16.gguf", "README.md", "report.json",
            "plot.png", "manifest.json", "recipe.yaml"} <= set(gguf)
    assert not any(name.startswith(STEM + "-GPTQ") or "/" in name for name in gguf)
    gptq = hub.tree(GPTQ4, "r1")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(gptq)
    assert not any(name.endswith(".gguf") for name in gptq)
    # weights went through the LFS batch API and its upload URL, text in the commit itself
    assert any(path == f"/{GGUF_REPO}.git/info/lfs/objects/batch" for _, path in hub.requests)
    assert hub.repos[GGUF_REPO].commits[hub.repos[GGUF_REPO].tags["r1"]][f"{STEM}-Q4_K_M.gguf"].lfs
    assert (published["run"] / f"{STEM}-Q4_K_M.gguf").read_bytes() == gguf[f"{STEM}-Q4_K_M.gguf"]
    # published locally too, and no temp folder of the Hub upload is left
    store = published["tmp"] / "artifacts" / "smollm2-135m-demo"
    assert os.readlink(store / "latest") == "r1" and not list(store.glob(".tmp-*"))


def test_each_repo_has_its_own_card(published):
    hub = published["hub"]
    cards = {repo_id: ModelCard(hub.tree(repo_id, "r1")["README.md"].decode()) for repo_id in hub.repos}
    for repo_id, card in cards.items():
        d = card.data
        assert d.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and d.base_model_relation == "quantized"
        assert d.pipeline_tag == "text-generation" and d.quantized_by == "quantkit"
        assert d.library_name == ("gguf" if repo_id == GGUF_REPO else "transformers")
        for other in set(hub.repos) - {repo_id}:
            assert f"[{other}](https://huggingface.co/{other})" in card.text
    gptq = cards[GPTQ4]
    assert "gptq" in gptq.data.tags and "4-bit" in gptq.data.tags
    assert gptq.data.quantization["variants"]["GPTQ-4bit-g128"]["group_size"] == 128
    assert f"vllm serve {GPTQ4}" in gptq.text and f'from_pretrained("{GPTQ4}")' in gptq.text
    rows = [line for line in gptq.text.split("## Scores")[1].splitlines() if line.startswith("| ")]
    assert [row.split("|")[3].strip() for row in rows[1:]] == ["F16", "BF16", "GPTQ-4bit-g128"]  # own row + bases
    assert {e.metric_name.split()[0] for e in gptq.data.eval_results} == {"GPTQ-4bit-g128"}  # the model's own
    gguf = cards[GGUF_REPO]
    assert gguf.data.quantization["variants"]["Q4_K_M"] == {"type": "Q4_K_M", "imatrix": True, "imatrix_settings":
                                                            {"ctx": 512, "chunks": 100}}
    assert f"`ollama run hf.co/{GGUF_REPO}:Q4_K_M`" in gguf.text
    assert f"`llama-server -hf {GGUF_REPO}:Q4_K_M`" in gguf.text
    assert "GPTQ-4bit-g128" not in gguf.text.split("## Scores")[1].split("##")[0]


def test_users_fetch_by_the_names_they_type(published):
    hub, user = published["hub"], published["user"]
    assert Path(user["gguf"]).read_bytes() == (published["run"] / f"{STEM}-Q4_K_M.gguf").read_bytes()
    assert json.loads(Path(user["gptq_config"]).read_text())["quantization_config"]["bits"] == 4
    assert user["model_type"] == "llama" and user["quantization_config"]["quant_method"] == "gptq"
    # llama-server -hf me/…-GGUF:Q4_K_M lists the tagged commit as llama.cpp does, then applies its rule
    commit = hub.repos[GGUF_REPO].tags["r1"]
    request = urllib.request.Request(f"{hub.url}/api/models/{GGUF_REPO}/tree/{commit}?recursive=true",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    listing = [e["path"] for e in json.loads(urllib.request.urlopen(request).read())]
    assert llama_cpp_pick(listing, "Q4_K_M") == [f"{STEM}-Q4_K_M.gguf"]
    assert hub_tag_files(listing, "Q4_K_M") == [f"{STEM}-Q4_K_M.gguf"]  # ollama run hf.co/…-GGUF:Q4_K_M


def test_the_token_reaches_the_hub_and_is_logged_and_written_nowhere(published):
    assert f"Bearer {TOKEN}" in published["hub"].authorizations
    assert TOKEN not in published["log"]
    leaked = [p for p in published["tmp"].rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaked == []
    for repo_id in published["hub"].repos:
        assert not any(TOKEN.encode() in data for data in published["hub"].tree(repo_id, "r1").values())


def test_split_ggufs_keep_their_tags(tmp_path, monkeypatch, tiny_f16_gguf, toolchain):
    """A GGUF over publish.max_file_gib goes up as the pinned llama-gguf-split's shards (the tiny Llama's
    real GGUF): the pinned llama.cpp's ``-hf repo:Q4_K_M`` fetches all of them from the local Hub and runs,
    quantkit's mirror of its rule agrees, and the card lists them with the merge line Ollama needs instead of
    ``ollama run`` (Ollama cannot import shards)."""
    import huggingface_hub.constants as c
    from huggingface_hub import HfApi

    splitter = toolchain.binary("llama-gguf-split")
    if not splitter.is_file():
        pytest.skip("the toolchain has no llama-gguf-split (built before #28); run `quantkit toolchain --build`")
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    manifest = hub_manifest()
    manifest["variants"] = manifest["variants"][:5]  # F16 … Q4_K_M
    manifest["recipe"]["resolved"] |= {"gptq": [], "awq": []}
    run = make_run_dir(tmp_path, manifest)
    big = run / f"{STEM}-Q4_K_M.gguf"
    big.write_bytes(tiny_f16_gguf.read_bytes())
    limit = big.stat().st_size // 3
    sharded = pub.shard_staged(run, manifest, gguf_split=splitter, max_file_bytes=limit)
    report = pub.build_report(sharded, config=CONFIG, chat_template=CHATML)
    with LocalHub(token=TOKEN) as hub:
        urls = pub.publish_hub_repos(staged=run, manifest=sharded, report=report,
                                     settings=Publish(target="hub", owner=OWNER), run_id="r1", recipe="demo",
                                     recipe_yaml=RECIPE_YAML, gguf_split=splitter,
                                     api=HfApi(endpoint=hub.url, token=TOKEN), max_file_bytes=limit)
        assert list(urls) == [GGUF_REPO]
        files = hub.tree(GGUF_REPO, "r1")
        # What `llama-server -hf me/…-GGUF:Q4_K_M` does, with the pinned llama.cpp's own download code
        # (common/download.cpp, shared by every tool): list the repo, take the first shard, fetch its siblings.
        env = {**_env(tmp_path, hub), "MODEL_ENDPOINT": hub.url + "/", "LLAMA_CACHE": str(tmp_path / "llama-cache")}
        heldout = Path(__file__).resolve().parents[1] / "calibration" / "eval" / "en-prose-heldout.txt"
        fetched = subprocess.run([toolchain.binary("llama-perplexity"), "-hf", f"{GGUF_REPO}:Q4_K_M", "-f", heldout,
                                  "-c", "128", "--chunks", "2", "-t", "2"], env=env, capture_output=True, text=True,
                                 timeout=300)
        got = sorted(path.rsplit("/", 1)[1] for method, path in hub.requests
                     if method == "GET" and f"/{GGUF_REPO}/resolve/" in path)
    # loaded from the shards and computing (the log's last lines can be lost at exit: scoring/llamacpp.py)
    assert fetched.returncode == 0 and "calculating perplexity over 2 chunks" in fetched.stderr, fetched.stderr[-3000:]
    (variant,) = [v for v in sharded.variants if v.shards]  # the typed manifest, as written to the staged run
    assert json.loads((run / "manifest.json").read_text()) == sharded.to_dict()
    assert got == [s.file for s in variant.shards]  # every shard, nothing else
    shards = [s.file for s in variant.shards]
    assert len(shards) >= 3 and shards[0] == f"{STEM}-Q4_K_M-00001-of-{len(shards):05d}.gguf"
    assert f"{STEM}-Q4_K_M.gguf" not in files and set(shards) <= set(files)
    assert all(len(files[s]) <= limit for s in shards)
    assert llama_cpp_pick(sorted(files), "Q4_K_M") == shards and hub_tag_files(sorted(files), "Q4_K_M") == shards
    assert [hashlib.sha256(files[s.file]).hexdigest() for s in variant.shards] == \
        [s.sha256 for s in variant.shards]  # the shards the manifest pins went up
    card = files["README.md"].decode()
    merge = f"llama-gguf-split --merge {shards[0]} {STEM}-Q4_K_M.gguf"
    assert f"`ollama run hf.co/{GGUF_REPO}:Q4_K_M`" not in card and f"merge first: `{merge}`" in card
    assert f"`llama-server -hf {GGUF_REPO}:Q4_K_M`" in card and f"`{shards[0]}`" in card
    assert all(f"| `{s.file}` | {s.size} | `{s.sha256}` |" in card for s in variant.shards)
    assert f"`ollama run hf.co/{GGUF_REPO}:Q8_0`" in card  # one file: Ollama pulls it as it is
