"""How cost grows with model size: every node of a recipe's graph, measured beside `quantkit plan`'s estimate.

For each size it writes a Llama-, Qwen- or Gemma-shaped checkpoint with random bf16 weights (the real configs'
widths, layers, heads and vocabularies; the demo model's tokenizer, or a sentencepiece model grown to the
vocabulary) and a recipe for it, then runs the recipe's graph (``quantkit.graph.build_graph``) one node at a
time, each as ``quantkit run --until NODE`` in a child process (the nodes it needs are already in the store
and reused). A size named by ``--gptq`` runs every node kind a text model's recipe makes: source, task items,
convert, imatrix, each quantize type, the size-budget search (sensitivity tables, KLD per role, the mix and
its GGUF), the base logits and scores, a task, speed, GPTQ and AWQ, torch scores, tasks and speed, a second
evaluation set, the serve checks (of the nodes that measure each variant, those of ``MEASURED_LABELS``);
the others the GGUF ladder only. The child's whole process tree is polled with psutil every 0.1 s:

- wall time of the node (the child process, including quantkit's hashing of what it wrote);
- peak RSS of the tree (sum over processes), of the tools it started, and their anonymous parts (RSS minus
  file-backed pages, which the kernel can drop: the mmapped safetensors or GGUF a tool reads);
- bytes written (the store entries the node added);
- ``llama-quantize --dry-run`` sizes of the full demo ladder, to check the estimator's per-tensor types.

Results go to ``benchmarks/results/scaling.json`` (one record per size, merged with earlier ones; the
model's safetensors headers and config are kept so ``report`` recomputes the estimates with today's
``quantkit/estimate.py``, and tests/test_estimate.py holds them to ±20 %). ``report`` writes every node to
``benchmarks/results/scaling.md`` and prints the worst error per node kind and shape. Weights and GGUFs live
under ``models/bench-work/`` (git-ignored) and are deleted after each size unless ``--keep``.

    .venv/bin/python benchmarks/scaling.py run --sizes smollm2-135m,vocab-262k --gptq smollm2-135m,vocab-262k
    .venv/bin/python benchmarks/scaling.py report      # tables + plot from the JSON, estimates recomputed
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "models" / "bench-work"
RESULTS = REPO / "benchmarks" / "results" / "scaling.json"
PLOT = REPO / "benchmarks" / "results" / "scaling.png"
TABLE = REPO / "benchmarks" / "results" / "scaling.md"  # every measured node (report writes it)
TOKENIZER_FROM = REPO / "models" / "smollm2-135m-instruct"
MiB = 2**20
GiB = 2**30

# Real shapes: Qwen2.5-0.5B/1.5B/3B/7B, Llama-3.2-1B/3B, Llama-3.1-8B.
SHAPES = {
    "qwen-0.5b": dict(arch="Qwen2ForCausalLM", model_type="qwen2", hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                      tie_word_embeddings=True),
    "llama-1b": dict(arch="LlamaForCausalLM", model_type="llama", hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=True),
    "qwen-1.5b": dict(arch="Qwen2ForCausalLM", model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                      num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                      tie_word_embeddings=True),
    "llama-3b": dict(arch="LlamaForCausalLM", model_type="llama", hidden_size=3072, intermediate_size=8192,
                     num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=True),
    "qwen-3b": dict(arch="Qwen2ForCausalLM", model_type="qwen2", hidden_size=2048, intermediate_size=11008,
                    num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                    tie_word_embeddings=True),
    "qwen-7b": dict(arch="Qwen2ForCausalLM", model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                    tie_word_embeddings=False),
    "llama-8b": dict(arch="LlamaForCausalLM", model_type="llama", hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     tie_word_embeddings=False),
    # Outside the shapes above: Gemma-3-270M's vocabulary and widths (262144 tokens, 640 wide, 18 layers) in a
    # Llama body, with a tokenizer of as many real pieces (the converter loads all of them) ...
    "vocab-262k": dict(arch="LlamaForCausalLM", model_type="llama", hidden_size=640, intermediate_size=2048,
                       num_hidden_layers=18, num_attention_heads=5, num_key_value_heads=1, vocab_size=262144,
                       tie_word_embeddings=True, tokenizer_pieces=262144),
    # Gemma-3-270M itself (its config.json: 262144 tokens, 640 wide, 4 heads of 256, 18 layers, extra norms).
    "gemma3-270m": dict(arch="Gemma3ForCausalLM", model_type="gemma3_text", hidden_size=640, intermediate_size=2048,
                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        vocab_size=262144, tie_word_embeddings=True, tokenizer_pieces=262144),
    # ... and an FFN 16 times the width (Llama's is 2.7 to 4), few layers.
    "ffn-wide": dict(arch="LlamaForCausalLM", model_type="llama", hidden_size=1024, intermediate_size=16384,
                     num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, vocab_size=49152,
                     tie_word_embeddings=True, tokenizer_pieces=0),
}
# Shapes off the size ladder: in the table and the ±20 % check, not in the lines fitted against parameters.
OUTSIDE_THE_LADDER = {"vocab-262k", "gemma3-270m", "ffn-wide"}
LADDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS"]  # the demo's: sized by --dry-run
MEASURED_TYPES = ["Q8_0", "Q4_K_M", "Q2_K"]  # the recipe's types: quantized for real (time and RAM)
# llama-imatrix and llama-perplexity put n_batch / ctx = 4 chunks of 512 in one batch: 8 and 4 chunks fill it
# (the first four sizes ran 2 and 2; each record keeps what it ran, and the estimates are made for that).
LADDER_RAN = {"imatrix": {"ctx": 512, "chunks": 2}, "evaluation": {"ctx": 512, "max_tokens": 1024}}
IMATRIX = {"ctx": 512, "chunks": 8}
EVALUATION = {"ctx": 512, "max_tokens": 2048}  # four chunks: base logits, PPL, KLD
GPTQ = {"bits": 4, "group_size": 64, "desc_act": True, "samples": 16, "seq_len": 128}  # the first records'
# Every node kind (the sizes named by --gptq since 2026-12-05): the demo recipe's GPTQ and AWQ settings, one
# more evaluation set, a task, speed, the serve checks and a size budget, bounded.
GPTQ_EVERY = {"bits": 4, "group_size": 64, "desc_act": False, "group_aware": True, "damp_percent": 0.1,
              "samples": 16, "seq_len": 128}
AWQ = {"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM", "samples": 8, "seq_len": 128,
       "clip": False}
EVERY_KIND = {"set_tokens": 1024, "task_items": 16, "bpw": 5.5, "awq": AWQ}
# Of the nodes that measure each variant, one or a few of a kind run (each is another pass of the same cost):
MEASURED_LABELS = {"score-gguf": {"F16", "Q4_K_M"}, "score-set-gguf": {"Q4_K_M"}, "tasks-gguf": {"Q4_K_M"},
                   "bench-gguf": {"Q4_K_M"}, "serve-gguf": {"Q4_K_M"}, "score-set-hf": {"GPTQ"},
                   "tasks-hf": {"HF", "GPTQ"}, "bench-hf": {"GPTQ"}, "serve-hf": {"GPTQ"}}
SHARD_BYTES = 2 * GiB
# The CPU features a record keeps (estimate.CpuRepack: what llama-bench and llama-server repack); the records
# without them were measured on an AMD EPYC without AMX
CPU_FLAGS = {"avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_bf16", "amx_tile"}
DEMO = "smollm2-135m"  # not generated: models/smollm2-135m-instruct (quantkit demo-model)


# --- the checkpoint -------------------------------------------------------------------------------

def config_for(name: str) -> dict:
    s = dict(SHAPES[name])
    arch = s.pop("arch")
    s.pop("tokenizer_pieces", None)
    cfg = {"architectures": [arch], "head_dim": s["hidden_size"] // s["num_attention_heads"], **s,
           "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "use_cache": True}
    if s["model_type"] == "gemma3_text":  # the rest of Gemma-3-270M's config.json
        cfg.update(hidden_activation="gelu_pytorch_tanh", rope_local_base_freq=10000.0, sliding_window=512,
                   query_pre_attn_scalar=256, final_logit_softcapping=None, attn_logit_softcapping=None,
                   layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                for i in range(s["num_hidden_layers"])], attention_bias=False, attention_dropout=0.0)
        cfg.pop("hidden_act")
    elif s["model_type"] == "qwen2":
        cfg.update(attention_dropout=0.0, sliding_window=None, use_sliding_window=False, max_window_layers=cfg[
            "num_hidden_layers"])
    else:
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return cfg


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
        if cfg["model_type"] == "qwen2":
            out += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]
        if cfg["model_type"] == "gemma3_text":
            out += [(p + "pre_feedforward_layernorm.weight", (h,)), (p + "post_feedforward_layernorm.weight", (h,)),
                    (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def write_checkpoint(name: str, dest: Path) -> dict:
    """Random bf16 weights in shards of at most 2 GiB, the config, the demo's tokenizer."""
    import torch
    from safetensors.torch import save_file

    cfg = config_for(name)
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    shapes = tensor_shapes(cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for tname, shape in shapes:
        n = 2 * int(torch.Size(shape).numel())
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((tname, shape))
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        for tname, shape in shard:
            t = torch.empty(shape, dtype=torch.bfloat16)
            if tname.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02)
            tensors[tname] = t
            weight_map[tname] = fname
        save_file(tensors, str(dest / fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(2 * int(torch.Size(s).numel()) for _, s in shapes)
        (dest / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    pieces = SHAPES[name].get("tokenizer_pieces")
    if cfg["model_type"] == "llama" and pieces is None:
        # its chat template too: without one the serve checks fail before they start a server (the first
        # 1.24 B every-kind run measured 66 MiB for serve-gguf so)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(TOKENIZER_FROM / f, dest / f)
    else:
        # a sentencepiece model (grown to ``pieces`` real pieces; else the trained one, which the converter pads
        # to the vocabulary), with its tokenizer.json. A qwen2 folder takes the converter's sentencepiece path
        # through it: the demo's tokenizer.json alone would be read as Qwen2Tokenizer's BPE, whose pre-tokenizer
        # hash the pinned converter does not know for this vocabulary.
        shutil.copy(sentencepiece_model(pieces or 0), dest / "tokenizer.model")
        write_tokenizer_json(dest / "tokenizer.model", dest / "tokenizer.json")
    return cfg


def sentencepiece_model(pieces: int = 0) -> Path:
    """tests/tinyllama.py's tokenizer (trained on the calibration text in seconds), cached; with ``pieces``,
    grown to that many pieces: made-up words of 3 to 10 letters after the trained ones, each with its
    score, as a large real vocabulary has (the converter then reads every one, none is padding)."""
    from tests.tinyllama import _train_sentencepiece

    done = WORK / "spm" / "tokenizer.model"
    if not done.is_file():
        done.parent.mkdir(parents=True, exist_ok=True)
        _train_sentencepiece(done.parent)
    if not pieces:
        return done
    grown = WORK / "spm" / f"tokenizer-{pieces}.model"
    if not grown.is_file():
        import random

        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(done.read_bytes())
        seen = {p.piece for p in proto.pieces}
        rng = random.Random(0)
        low = min(p.score for p in proto.pieces)
        while len(proto.pieces) < pieces:
            letters = rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 10))
            word = "\u2581" * rng.randint(0, 1) + "".join(letters)
            if word in seen:
                continue
            seen.add(word)
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = word, low - len(proto.pieces), 1  # NORMAL
        grown.write_bytes(proto.SerializeToString())
    return grown


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer_json(model: Path, dest: Path) -> None:
    """Beside tokenizer.model, the tokenizer.json a sentencepiece model ships with (Gemma's does): a Unigram
    vocabulary of every piece with its score, which transformers loads and the converter's gguf.SpecialVocab
    parses whole; and a tokenizer_config.json with a ChatML template, for the serve checks."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    vocab = [[p.piece, p.score] for p in proto.pieces]
    unk = next((i for i, p in enumerate(proto.pieces) if p.type == 2), 0)  # UNKNOWN
    dest.write_text(json.dumps({
        "version": "1.0", "added_tokens": [], "normalizer": {"type": "Replace", "pattern": {"String": " "},
                                                             "content": "\u2581"},
        "pre_tokenizer": None, "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never",
                                           "split": True},
        "model": {"type": "Unigram", "unk_id": unk, "byte_fallback": True, "vocab": vocab}}, ensure_ascii=False))
    (dest.parent / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "bos_token": proto.pieces[1].piece, "eos_token": proto.pieces[2].piece,
         "unk_token": proto.pieces[unk].piece}))


def read_headers(folder: Path) -> list[dict]:
    headers = []
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            headers.append(json.loads(fh.read(n)))
    return headers


# --- one node of the graph in a child process --------------------------------------------------------

def recipe_text(name: str, *, gptq: dict | None, imatrix: dict = IMATRIX, evaluation: dict = EVALUATION,
                every_kind: dict | None = None) -> str:
    """The size's recipe. With ``every_kind`` (``--gptq`` sizes), every node kind a text model's recipe makes:
    a second evaluation set, a task, speed, the serve checks, a size budget, GPTQ and AWQ, each bounded."""
    lines = [f"name: bench-{name}", "model:", f"  path: models/bench-work/{name}/hf", f"  name: bench-{name}",
             "calibration:", "  files: [calibration/en-prose.txt, calibration/code-python.txt]",
             "evaluation:", "  file: calibration/eval/en-prose-heldout.txt",
             f"  ctx: {evaluation['ctx']}", f"  max_tokens: {evaluation['max_tokens']}"]
    if every_kind:
        lines += ["  sets:", "    - {name: code, file: calibration/eval/code-python-heldout.txt, ctx: 512,"
                  f" max_tokens: {every_kind['set_tokens']}}}",
                  "  bench_reps: 1", "  tasks:", f"    - {{name: which-word-fits, limit: {every_kind['task_items']}}}"]
    else:
        lines.append("  bench: false")
    lines += ["gguf:", "  base_type: f16",
              f"  imatrix: {{enabled: true, ctx: {imatrix['ctx']}, chunks: {imatrix['chunks']}}}",
              f"  types: [{', '.join(MEASURED_TYPES)}]"]
    if every_kind:
        lines += [f"  targets: [{{bpw: {every_kind['bpw']}}}]"]
    if gptq:
        lines += ["gptq:"] + _yaml_item(gptq)
    if every_kind:
        from quantkit.gptq import unsupported

        if unsupported(SHAPES.get(name, {}).get("arch"), "awq") is None:  # validate refuses it (Gemma-3)
            lines += ["awq:"] + _yaml_item(every_kind["awq"])
        lines += ["serve: {}"]
    return "\n".join(lines) + "\n"


def _yaml_item(settings: dict) -> list[str]:
    return [("  - " if i == 0 else "    ") + f"{k}: {str(v).lower() if isinstance(v, bool) else v}"
            for i, (k, v) in enumerate(settings.items())]


def recipe_of(name: str, **settings):
    import yaml

    from quantkit.recipe import Recipe

    return Recipe.model_validate(yaml.safe_load(recipe_text(name, **settings)), context={"root": REPO})


def measured_nodes(recipe) -> list:
    """The graph's nodes this benchmark measures, in graph order: all but the run folder, and of the nodes
    that measure a variant those of ``MEASURED_LABELS`` (a label's first word: "GPTQ" is GPTQ-4bit-g64)."""
    from quantkit.graph import build_graph

    def wanted(node) -> bool:
        labels = MEASURED_LABELS.get(node.kind)
        return node.kind != "run-folder" and (labels is None or node.label.split("-")[0] in labels
                                              or node.label.split(":")[0] in labels)

    return [n for n in build_graph(recipe, publish=False) if wanted(n)]


def _entries(store: Path) -> dict[str, int]:
    """Finished store entries (``step/key``) and their bytes."""
    out = {}
    for entry in store.glob("*/*/entry.json"):
        out[f"{entry.parent.parent.name}/{entry.parent.name}"] = sum(
            f.stat().st_size for f in entry.parent.rglob("*") if f.is_file())
    return out


def measure(name: str, node) -> dict:
    """``quantkit run --until NODE`` in a child process (what it needs is already in the store, reused),
    polling its process tree; the bytes are those of the store entries it added."""
    import psutil

    store = WORK / name / "store"
    before = _entries(store)
    cmd = [str(REPO / ".venv" / "bin" / "quantkit"), "-q", "run", "--no-publish", "--until", node.name,
           str(WORK / name / "recipe.yaml")]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "QUANTKIT_STORE": str(store)})
    root = psutil.Process(proc.pid)
    peak = {"rss": 0, "anon": 0, "tool_rss": 0, "tool_anon": 0}
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        rss = anon = trss = tanon = 0
        for p in procs:
            try:
                m = p.memory_info()
            except psutil.NoSuchProcess:
                continue
            rss += m.rss
            anon += m.rss - m.shared
            if p.pid != root.pid:
                trss += m.rss
                tanon += m.rss - m.shared
        for k, v in (("rss", rss), ("anon", anon), ("tool_rss", trss), ("tool_anon", tanon)):
            peak[k] = max(peak[k], v)
        time.sleep(0.1)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    # a task that scores at chance fails its check after the node ran and stored its result: random weights
    # do, so that is measured like any other run (and said in the record)
    at_chance = proc.returncode != 0 and "scores at chance" in err
    if proc.returncode != 0 and not at_chance:
        raise SystemExit(f"{name} {node.name} failed ({proc.returncode}):\n{err[-4000:]}")
    added = {k: v for k, v in _entries(store).items() if k not in before}
    rec = {"node": node.name, "kind": node.kind, "label": node.label, "seconds": round(seconds, 2), **peak,
           "bytes": sum(added.values()), "entries": sorted(added), **({"at_chance": True} if at_chance else {})}
    for key in added:
        if (score := store / key / "score.json").is_file():
            s = json.loads(score.read_text())
            rec.update(ppl=s["ppl"], kld_mean=s["kld_mean"])
    print(f"  {node.name:22s} {seconds:7.1f} s  rss {peak['rss'] / MiB:8.0f} MiB (anon {peak['anon'] / MiB:6.0f},"
          f" tool {peak['tool_rss'] / MiB:6.0f}/{peak['tool_anon'] / MiB:6.0f})  wrote {rec['bytes'] / MiB:9.1f} MiB",
          flush=True)
    return rec


def dry_run_sizes(name: str) -> dict[str, int]:
    """``llama-quantize --dry-run`` total of every ladder type (tensor data only, no metadata)."""
    from quantkit.toolchain import find_toolchain

    tc = find_toolchain(cuda=False)
    store = WORK / name / "store"
    base = next(store.glob("convert/*/model.gguf"))
    imat = next(store.glob("imatrix/*/imatrix.gguf"))
    sizes = {}
    for t in LADDER:
        run = subprocess.run([tc.binary("llama-quantize"), "--dry-run", "--imatrix", imat, base, t, "2"],
                             capture_output=True, text=True)
        m = re.search(r"quant size\s*=\s*([\d.]+) MiB", run.stdout + run.stderr)
        sizes[t] = round(float(m.group(1)) * MiB) if m else None
    return sizes


def run_size(name: str, *, every_kind: bool, keep: bool) -> dict:
    folder = WORK / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "hf").mkdir(parents=True)
    settings = {"imatrix": IMATRIX, "evaluation": EVALUATION, "gptq": GPTQ_EVERY if every_kind else None,
                "every_kind": EVERY_KIND if every_kind else None}
    (folder / "recipe.yaml").write_text(recipe_text(name, **settings))
    t0 = time.perf_counter()
    if name == DEMO:  # the demo's checkpoint itself (trained weights, Llama shape): hard links, no copy
        for f in TOKENIZER_FROM.iterdir():
            os.link(f, folder / "hf" / f.name)
        cfg = json.loads((folder / "hf" / "config.json").read_text())
    else:
        print(f"{name}: writing random weights", flush=True)
        cfg = write_checkpoint(name, folder / "hf")
    headers = read_headers(folder / "hf")
    params = sum(_numel(m["shape"]) for h in headers for k, m in h.items() if k != "__metadata__")
    print(f"{name}: {params / 1e9:.2f} B parameters, written in {time.perf_counter() - t0:.0f} s", flush=True)
    nodes = [measure(name, node) for node in measured_nodes(recipe_of(name, **settings))]
    from quantkit.estimate import tokenizer_bytes

    record = {"name": name, "parameters": params, "config": cfg, "headers": _slim(headers),
              "source_bytes": sum(f.stat().st_size for f in (folder / "hf").glob("*.safetensors")),
              "tokenizer_bytes": tokenizer_bytes(folder / "hf"),
              "nodes": nodes, "dry_run": dry_run_sizes(name), "machine": _machine(),
              "date": time.strftime("%Y-%m-%d"), **settings}
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return record


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _slim(headers: list[dict]) -> list[dict]:
    """Headers without offsets (what the estimate reads: names, dtypes, shapes)."""
    return [{k: {"dtype": m["dtype"], "shape": m["shape"]} for k, m in h.items() if k != "__metadata__"}
            for h in headers]


def _machine() -> dict:
    import platform

    import psutil

    from quantkit.estimate import cpu_info

    info = cpu_info()
    return {"cpu": info.get("model name") or platform.processor(), "cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
            "flags": sorted(set(info.get("flags", "").split()) & CPU_FLAGS)}


def save(record: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"schema": 1, "sizes": []}
    data["sizes"] = [s for s in data["sizes"] if s["name"] != record["name"]] + [record]
    data["sizes"].sort(key=lambda s: s["parameters"])
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, RESULTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--sizes", default="qwen-0.5b,llama-1b,qwen-1.5b,llama-3b")
    r.add_argument("--gptq", default=DEMO, help="sizes that run every node kind (GPTQ, AWQ, torch scoring, tasks, "
                   "speed, serve checks, a size budget, a second set), not only the GGUF ladder")
    r.add_argument("--keep", action="store_true")
    sub.add_parser("report")
    args = ap.parse_args()
    if args.cmd == "run":
        for name in args.sizes.split(","):
            save(run_size(name, every_kind=name in args.gptq.split(","), keep=args.keep))
    else:
        report()



# --- estimates beside the measurements -------------------------------------------------------------

# Kinds whose work is in quantkit's own Python (torch, GPTQModel, lm-eval, numpy over the GGUF tensors), with
# or without a tool beside it: the whole tree counts. The others' estimates are of the tool they run.
IN_PROCESS = {"source", "task-items", "gptq", "awq", "rtn", "score-hf", "score-set-hf", "tasks-hf", "bench-hf",
              "serve-hf", "sensitivity", "mix"}


def estimates(size: dict) -> list[dict]:
    """Each measured node with the estimate ``quantkit plan`` makes for it and the error (estimate / measured - 1)."""
    from quantkit.estimate import CpuRepack, ModelFacts, on_cpu
    from quantkit.graph import build_graph, node_cost

    facts = ModelFacts.from_headers(size["headers"], size["config"], tokenizer_bytes=size.get("tokenizer_bytes"))
    recipe = recipe_of(size["name"], gptq=size.get("gptq"), imatrix=size["imatrix"], evaluation=size["evaluation"],
                       every_kind=size.get("every_kind"))
    graph = {n.name: n for n in build_graph(recipe, publish=False)}
    rows = []
    for measured in size["nodes"]:
        node = graph[measured["node"]]
        with on_cpu(CpuRepack.from_flags(size["machine"].get("flags", []))):  # the CPU it was measured on
            c = node_cost(recipe, node, facts)
        ram = measured["rss"] if node.kind in IN_PROCESS else measured["tool_rss"]
        disk = measured["bytes"] if measured["bytes"] > 1 * MiB else None
        rows.append({**measured, "ram": ram, "est_ram": c.ram_bytes, "est_disk": c.disk_bytes if disk else None,
                     "ram_err": c.ram_bytes / ram - 1 if c.ram_bytes and ram else None,
                     "disk_err": c.disk_bytes / disk - 1 if disk and c.disk_bytes else None})
    return rows


def report(results: Path = RESULTS, plot: Path = PLOT, table: Path = TABLE) -> str:
    """Every measured node beside its estimate (written to ``table``), and printed: per node kind and shape the
    worst RAM and disk error, the fitted slopes, the 8B plan; the plot of time, RAM and disk against parameters."""
    data = json.loads(results.read_text())
    lines = ["| size | params | node | time s | peak RSS MiB | est. RAM MiB | RAM err | written MiB | est. disk MiB "
             "| disk err |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    series: dict[str, list[tuple[float, float, float, float]]] = {}
    worst = []
    by_kind: dict[str, dict[str, list]] = {}  # kind -> size -> the errors of its nodes there
    for size in data["sizes"]:
        for r in estimates(size):
            key = r["node"]
            pct = lambda e: "" if e is None else f"{e * 100:+.0f} %"  # noqa: E731
            mib = lambda b: "" if b is None else f"{b / MiB:.0f}" if b >= 10 * MiB else f"{b / MiB:.1f}"  # noqa: E731
            lines.append(f"| {size['name']} | {size['parameters'] / 1e9:.2f} B | {key} | {r['seconds']:.1f} | "
                         f"{mib(r['ram'])} | {mib(r['est_ram'])} | {pct(r['ram_err'])} | "
                         f"{mib(r['bytes']) if r['bytes'] > MiB else ''} | {mib(r['est_disk'])} | "
                         f"{pct(r['disk_err'])} |")
            by_kind.setdefault(r["kind"], {}).setdefault(size["name"], []).append(r)
            if size["name"] not in OUTSIDE_THE_LADDER:
                series.setdefault(key, []).append((size["parameters"], r["seconds"], r["ram"], r["bytes"]))
            for what in ("ram_err", "disk_err"):
                if r[what] is not None and abs(r[what]) > 0.2:
                    worst.append(f"{size['name']} {key} {what[:-4]} {r[what] * 100:+.0f} %")
        dry = size.get("dry_run") or {}
        if dry:
            from quantkit.estimate import ModelFacts, quantize_types, tensor_bytes

            facts = ModelFacts.from_headers(size["headers"], size["config"])
            exact = all(abs(sum(tensor_bytes(t, ty) for t, ty in quantize_types(facts, q, has_imatrix=True)) - b)
                        <= 0.006 * MiB for q, b in dry.items() if b)
            lines.append(f"| {size['name']} | | llama-quantize --dry-run, {len(dry)} types | | | | | | | "
                         f"{'exact' if exact else 'DIFFERS'} |")
    table.write_text("# Every measured node (`benchmarks/scaling.py report` writes this file)\n\n"
                     + "\n".join(lines) + "\n")
    summary = kind_summary(by_kind, [s["name"] for s in data["sizes"]])
    slopes = ["", "| node | time s per B params | peak RSS GiB per B params | written GiB per B params |",
              "|---|---:|---:|---:|"]
    import numpy as np

    fits = {}
    for key, pts in sorted(series.items()):
        if len({p[0] for p in pts}) < 2:
            continue
        x = np.array([p[0] for p in pts]) / 1e9
        fits[key] = [np.polyfit(x, np.array([p[i] for p in pts]) / (1 if i == 1 else GiB), 1) for i in (1, 2, 3)]
        slopes.append(f"| {key} | {fits[key][0][0]:.1f} | {fits[key][1][0]:.2f} | {fits[key][2][0]:.2f} |")
    text = "\n".join(summary + slopes + ["", "beyond ±20 %: " + ("; ".join(worst) or "none"), ""] + at_8b(fits))
    _plot(series, plot)
    print(text)
    return text


def kind_summary(by_kind: dict, sizes: list[str]) -> list[str]:
    """One row per node kind, one column per shape: the estimate's largest RAM error and largest disk error
    over the kind's nodes there ("RAM / disk", in %; no disk figure where the node writes under 1 MiB)."""
    out = ["| node kind | " + " | ".join(sizes) + " |", "|---|" + "---:|" * len(sizes)]

    def largest(errs: list) -> str:
        errs = [e for e in errs if e is not None]
        return f"{max(errs, key=abs) * 100:+.0f}" if errs else ""

    for kind, cells in by_kind.items():
        row = []
        for name in sizes:
            rs = cells.get(name)
            if not rs:
                row.append("")
                continue
            ram = largest([r["ram_err"] for r in rs]) or ("no est." if all(r["est_ram"] is None for r in rs) else "")
            disk = largest([r["disk_err"] for r in rs])
            row.append(ram + (f" / {disk}" if disk else ""))
        out.append(f"| {kind} | " + " | ".join(row) + " |")
    return out


def at_8b(fits: dict, name: str = "llama-8b") -> list[str]:
    """``quantkit plan``'s estimate for an 8B shape (headers only, as for a Hub repo not downloaded) beside
    the fitted lines extrapolated to its parameter count: do the formulas grow as the measurements do?"""
    import numpy as np

    from quantkit.estimate import ModelFacts
    from quantkit.graph import build_graph, node_cost

    cfg = config_for(name)
    facts = ModelFacts.from_headers([{n: {"dtype": "BF16", "shape": list(s)} for n, s in tensor_shapes(cfg)}], cfg)
    b = facts.parameters / 1e9
    recipe = recipe_of(name, gptq=GPTQ, **LADDER_RAN)  # what the fitted sizes ran
    out = [f"| {name} ({b:.2f} B) node | plan RAM GiB | fitted line RAM GiB | plan disk GiB | fitted line disk GiB |",
           "|---|---:|---:|---:|---:|"]
    for node in build_graph(recipe, publish=False):
        if node.name not in fits:
            continue
        c = node_cost(recipe, node, facts)
        _, ram, disk = (np.polyval(f, b) for f in fits[node.name])
        show = lambda v: "" if v is None else f"{v / GiB:.2f}"  # noqa: E731
        out.append(f"| {node.name} | {show(c.ram_bytes)} | {ram:.2f} | {show(c.disk_bytes)} | "
                   f"{disk:.2f} |" if disk > 0.01 else f"| {node.name} | {show(c.ram_bytes)} | {ram:.2f} | | |")
    return out


def _plot(series: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for n, (key, pts) in enumerate(sorted(series.items())):
        pts = sorted(pts)
        x = [p[0] / 1e9 for p in pts]
        style = dict(color=f"C{n % 10}", linestyle="-" if n < 10 else "--")  # one look per node in every panel
        for ax, i, scale in ((axes[0], 1, 1), (axes[1], 2, GiB), (axes[2], 3, GiB)):
            y = [p[i] / scale for p in pts]
            if i == 3 and max(y) < 0.01:
                continue
            ax.plot(x, y, marker="o", label=key, **style)
    for ax, title in zip(axes, ("wall time (s), 2 shared cores", "peak RSS (GiB)", "written (GiB)")):
        ax.set_xlabel("parameters (B)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
