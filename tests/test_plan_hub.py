"""`quantkit plan` for a Hub model that is not on disk: the cost from the safetensors headers and config.json
only (served by the local Hub), the verdict for this machine, the preflight's refusal, and offline."""

from __future__ import annotations

import contextlib
import json
import struct
import textwrap
from pathlib import Path

import pytest

from quantkit.plan import Machine, plan, render, totals

from localhub import LocalHub

REPO = "meta-llama/Llama-3.1-8B-Instruct"
COMMIT = "0e9e39f249a16976918f6564b8830bc894c89659"
GiB = 2**30
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
          "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 131072,
          "torch_dtype": "bfloat16"}


def llama_shapes(*, hidden: int, ffn: int, vocab: int, kv: int, layers: int) -> list[tuple[str, list[int]]]:
    """Every tensor of a Llama checkpoint (untied output) as transformers names and shapes it."""
    h, f, v = hidden, ffn, vocab
    out = [("model.embed_tokens.weight", [v, h])]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h]),
                (p + "self_attn.q_proj.weight", [h, h]), (p + "self_attn.k_proj.weight", [kv, h]),
                (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.o_proj.weight", [h, h]),
                (p + "mlp.gate_proj.weight", [f, h]), (p + "mlp.up_proj.weight", [f, h]),
                (p + "mlp.down_proj.weight", [h, f])]
    return out + [("model.norm.weight", [h]), ("lm_head.weight", [v, h])]


def llama_8b_shapes() -> list[tuple[str, list[int]]]:
    return llama_shapes(hidden=4096, ffn=14336, vocab=128256, kv=1024, layers=32)


def header_only(tensors: list[tuple[str, list[int]]]) -> bytes:
    """A safetensors file cut after its header: the offsets point at weights that are not there."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_header_repo(folder: Path, parts: dict[str, list[tuple[str, list[int]]]], config: dict) -> Path:
    """A sharded checkpoint as the Hub stores it, each shard only its header: the shards, their index and
    config.json."""
    folder.mkdir()
    for name, part in parts.items():
        (folder / name).write_bytes(header_only(part))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {t: f for f, part in parts.items() for t, _ in part}}))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@contextlib.contextmanager
def hub_online(repo: str, folder: Path, commit: str, monkeypatch, cache: Path):
    """The local Hub serving ``folder`` as ``repo`` at ``commit``, and huggingface_hub pointed at it (online,
    with its own cache)."""
    from huggingface_hub import constants

    with LocalHub(repo, folder, commit, None) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(cache))
        yield hub


@pytest.fixture
def hub_repo(tmp_path):
    """The 8B repo as the Hub has it, two shards and the index, each shard only its header."""
    shapes = llama_8b_shapes()
    halves = {"model-00001-of-00002.safetensors": shapes[:150], "model-00002-of-00002.safetensors": shapes[150:]}
    with LocalHub(REPO, write_header_repo(tmp_path / "hub-files", halves, CONFIG), COMMIT, None) as hub:
        yield hub


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "calibration" / "eval").mkdir(parents=True)
    (tmp_path / "calibration" / "calib.txt").write_text("Calibration paragraph. " * 40 + "\n")
    (tmp_path / "calibration" / "eval" / "heldout.txt").write_text("Held-out paragraph. " * 40 + "\n")
    (tmp_path / "recipes" / "llama-8b.yaml").write_text(textwrap.dedent(f"""\
        name: llama-8b
        model: {{repo: {REPO}, revision: {COMMIT}}}
        calibration: {{files: [calibration/calib.txt]}}
        evaluation: {{file: calibration/eval/heldout.txt, ctx: 512, max_tokens: 4096, bench: false}}
        gguf:
          imatrix: {{enabled: true, ctx: 512, chunks: 100}}
          types: [Q8_0, Q4_K_M, Q2_K]
        """))
    monkeypatch.setenv("QUANTKIT_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("QUANTKIT_PROJECT", str(tmp_path))
    return tmp_path


@pytest.fixture
def online(hub_repo, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub_repo.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(tmp_path / "hf-cache"))
    return hub_repo


def context(project: Path):
    from quantkit.context import RunContext

    return RunContext.from_env(project / "recipes" / "llama-8b.yaml", toolchain="find")


def test_plan_reads_headers_and_config_only(project, online):
    rows = {r.name: r for r in plan(context(project))}
    assert rows["convert"].unknown is None
    # Only headers, the index and config.json went over the wire (the shards here are headers and nothing else).
    fetched = sorted({p.rsplit("/", 1)[-1] for m, p in online.requests if m == "GET" and "/resolve/" in p})
    assert fetched == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                       "model.safetensors.index.json"]
    params = 8_030_261_248  # Llama-3.1-8B
    assert rows["source"].disk_bytes == 2 * params  # the download, bf16
    # F16 GGUF: every tensor at 2 bytes (norms f32) plus the header.
    assert 2 * params < rows["convert"].disk_bytes < 2 * params + 16 * 2**20
    # llama-quantize's own sizes for Llama-3.1-8B (Q8_0 7.95 GiB, Q4_K_M 4.58 GiB, Q2_K 2.95 GiB published).
    assert rows["quantize:Q8_0"].disk_bytes / GiB == pytest.approx(7.95, abs=0.03)
    assert rows["quantize:Q4_K_M"].disk_bytes / GiB == pytest.approx(4.58, abs=0.03)
    assert rows["quantize:Q2_K"].disk_bytes / GiB == pytest.approx(2.95, abs=0.03)
    # imatrix and scoring map the 15 GiB F16: RAM above that, well below twice it.
    assert 15 * GiB < rows["imatrix"].ram_bytes < 20 * GiB
    assert all(r.disk_bytes is not None for r in rows.values())
    assert not totals(list(rows.values())).unknown


def test_plan_says_the_machine_cannot_hold_it(project, online):
    rows = plan(context(project))
    text = render(rows, have=Machine(free_disk=40 * GiB, available_ram=8 * GiB))
    last = text.splitlines()[-1]
    assert last.startswith("this machine cannot hold the run: it needs ")
    assert "RAM (imatrix); this machine has 40.00 GiB free disk, 8.00 GiB RAM available: not enough disk and RAM " \
           "(`quantkit run` refuses before any work)" in last
    fits = render(rows, have=Machine(free_disk=500 * GiB, available_ram=64 * GiB)).splitlines()[-1]
    assert fits.endswith("this machine has 500.00 GiB free disk, 64.00 GiB RAM available: it fits")


def test_preflight_refuses_with_the_numbers(project, online, monkeypatch):
    import quantkit.plan
    from quantkit.errors import ResourceError
    from quantkit.executor import preflight

    monkeypatch.setattr(quantkit.plan, "machine", lambda root: Machine(free_disk=40 * GiB, available_ram=8 * GiB))
    with pytest.raises(ResourceError, match=r"needs about \d+\.\d\d GiB more disk .* only 40\.00 GiB is free"):
        preflight(context(project))
    monkeypatch.setattr(quantkit.plan, "machine", lambda root: Machine(free_disk=500 * GiB, available_ram=8 * GiB))
    with pytest.raises(ResourceError, match=r"node imatrix needs about 1\d\.\d\d GiB of RAM, 8\.00 GiB is available"):
        preflight(context(project))


def test_offline_plan_says_what_is_unknown_and_why(project, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rows = plan(context(project))
    text = render(rows, have=Machine(free_disk=500 * GiB, available_ram=64 * GiB))
    assert "?" not in text
    why = (f"HF_HUB_OFFLINE=1 and {REPO} is not in the Hugging Face cache: the safetensors headers and "
           "config.json cannot be read")
    unknown = [line for line in text.splitlines() if line.startswith("unknown: ")]
    assert unknown == [f"unknown: disk and RAM of {len(totals(rows).unknown)} nodes (source, convert, imatrix, "
                       f"quantize:Q8_0, ...): {why}"]
    assert text.splitlines()[-1].startswith("whether it fits is unknown; this machine has ")
    assert "new disk and peak RAM: unknown" in text  # not "0 KiB"


def test_plan_shows_the_shards_of_ggufs_over_max_file_gib(project, online):
    """From headers alone: with publish.max_file_gib 5, the 15 GiB F16 and the 7.95 GiB Q8_0 are published
    as llama-gguf-split shards (at most 97 % of the limit each), the 4.58 GiB Q4_K_M as one file."""
    recipe = project / "recipes" / "llama-8b.yaml"
    recipe.write_text(recipe.read_text() + "publish: {max_file_gib: 5}\n")
    rows = {r.name: r for r in plan(context(project))}
    shard = 5 * GiB * 0.97
    assert rows["convert"].shards == -(-rows["convert"].disk_bytes // shard) == 4
    assert rows["quantize:Q8_0"].shards == 2 and rows["quantize:Q4_K_M"].shards is None
    assert all(r.shards is None for n, r in rows.items() if not n.startswith(("convert", "quantize:")))
    line = next(ln for ln in render(list(rows.values())).splitlines() if ln.startswith("convert "))
    assert f"{rows['convert'].disk_bytes / GiB:.2f} GiB (4 shards)" in line
