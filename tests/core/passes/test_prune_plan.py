"""plan_removal: the one question structured pruning asks of a node, answered with channels (the
node's own or its MLP's), an attention's query heads, or the reason neither can go."""

from __future__ import annotations

from llm_builders import kv_decoder
from model_builders import small_mlp
from opstudio.core.passes._channels import Channels, is_mlp, members, plan_removal
from opstudio.core.passes._heads import Heads


def _node(model, suffix):
    return next(n for n in model.graph.node if n.name.endswith(suffix))


def test_an_mlp_layer_gives_the_channels_of_the_whole_mlp():
    model = small_mlp()
    for name in ("fc1", "fc2"):  # fc2's outputs are the model's: it goes with fc1
        plan = plan_removal(model, _node(model, name))
        assert isinstance(plan, Channels) and is_mlp(plan)
        assert members(plan) == ["fc1", "fc2"] and plan.channels == 128


def test_an_attention_projection_gives_heads_and_a_kv_projection_a_reason():
    model = kv_decoder("gqa", layers=1, hidden=64, heads=4, kv_heads=2)
    q_proj, o_proj = _node(model, "q_proj/MatMul"), _node(model, "o_proj/MatMul")
    for node in (q_proj, o_proj):
        plan = plan_removal(model, node)
        assert isinstance(plan, Heads) and plan.members == [q_proj.name, o_proj.name]
        assert (plan.heads, plan.group) == (4, 2)
    why = plan_removal(model, _node(model, "k_proj/MatMul"))
    assert isinstance(why, str) and "KV cache" in why
