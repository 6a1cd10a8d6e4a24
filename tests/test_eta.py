"""The console's ETA weighs what is left by the plan's time estimates, not by the average node."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantkit.estimate import ModelFacts
from quantkit.graph import Node, node_seconds
from quantkit.executor import Eta
from quantkit.recipe import load_recipe

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-demo.yaml"


def test_a_slow_node_ahead_is_in_the_eta():
    eta = Eta({"convert": 10.0, "quantize": 10.0, "awq": 500.0, "report": None}, {"convert", "quantize", "awq", "report"})
    # convert took twice its estimate: this machine is half as fast; what is left is quantize + awq + report
    # (a node without an estimate counts as the mean of the known ones, 520 / 3)
    assert eta.left("convert", 20.0, {"convert"}) == pytest.approx(2 * (10 + 500 + 520 / 3))
    # a reused node neither costs time nor changes the speed
    assert eta.left("quantize", None, {"convert", "quantize"}) == pytest.approx(2 * (500 + 520 / 3))
    assert eta.left("awq", 1000.0, {"convert", "quantize", "awq"}) == pytest.approx((1020 / 510) * 520 / 3)
    assert eta.left("report", 1.0, {"convert", "quantize", "awq", "report"}) is None  # nothing left


def test_the_demo_plan_knows_which_nodes_are_slow():
    """SmolLM2's shapes (read from its config, no weights): AWQ with the clipping search costs several GPTQs,
    a torch task pass twice a llama.cpp one or more; the demo turns clipping off."""
    recipe = load_recipe(DEMO)
    shapes = {"model.embed_tokens.weight": [49152, 576]} | {
        f"model.layers.{i}.{m}.weight": s for i in range(30) for m, s in
        (("self_attn.q_proj", [576, 576]), ("self_attn.k_proj", [192, 576]), ("self_attn.v_proj", [192, 576]),
         ("self_attn.o_proj", [576, 576]), ("mlp.gate_proj", [1536, 576]), ("mlp.up_proj", [1536, 576]),
         ("mlp.down_proj", [576, 1536]))}
    facts = ModelFacts.from_headers([{k: {"dtype": "F32", "shape": v} for k, v in shapes.items()}],
                                    {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30})
    def seconds(recipe, kind, params, facts):
        return node_seconds(recipe, Node(kind, kind, "", params=params), facts)

    est = {kind: seconds(recipe, kind, params, facts) for kind, params in (
        ("gptq", {"index": 0}), ("awq", {"index": 0}), ("tasks-gguf", {"task": "finish-the-sentence"}),
        ("tasks-hf", {"task": "finish-the-sentence", "is_base": True}), ("quantize", {"index": 3}))}
    clipped = seconds(recipe.model_copy(update={"awq": [recipe.awq[0].model_copy(update={"clip": True})]}),
                      "awq", {"index": 0}, facts)
    assert clipped > 3 * est["awq"] and clipped > 3 * est["gptq"]
    assert est["tasks-hf"] > 2 * est["tasks-gguf"] > 2 * est["quantize"]  # measured: 71 s, 26-45 s, 3 s
