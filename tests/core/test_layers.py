"""Layers, modules and roles read from node names; totals per layer, module and role."""

from __future__ import annotations

import time

import pytest

from layer_models import PER_LAYER, layered_decoder
from opstudio.core.model.graph import analyze
from opstudio.core.model.layers import (
    ATTENTION,
    EMBEDDING,
    LM_HEAD,
    MLP,
    NORM,
    OTHER,
    group_layers,
    scope_of,
)


@pytest.mark.parametrize(("name", "stack", "layer", "role", "module"), [
    # onnxruntime-genai builder / torch.onnx scoped names
    ("/model/layers.12/mlp/up_proj/MatMul", "model.layers", 12, "mlp/up_proj/MatMul", MLP),
    ("/model/layers.3/self_attn/q_proj/MatMul", "model.layers", 3, "self_attn/q_proj/MatMul",
     ATTENTION),
    ("/model/layers.0/attn/GroupQueryAttention", "model.layers", 0, "attn/GroupQueryAttention",
     ATTENTION),
    ("/model/layers.1/post_attention_layernorm/SkipLayerNorm", "model.layers", 1,
     "post_attention_layernorm/SkipLayerNorm", NORM),
    ("/model/layers.0/mlp/act_fn/Sigmoid", "model.layers", 0, "mlp/act_fn/Sigmoid", MLP),
    ("/model/layers.4/Add_1", "model.layers", 4, "Add_1", OTHER),
    # torch-style module paths
    ("model.layers.3.mlp.up_proj", "model.layers", 3, "mlp/up_proj", MLP),
    ("model.layers.8.input_layernorm.weight_cast", "model.layers", 8,
     "input_layernorm/weight_cast", NORM),
    ("transformer.h.5.attn.c_attn", "transformer.h", 5, "attn/c_attn", ATTENTION),
    ("transformer.h.5.mlp.c_proj", "transformer.h", 5, "mlp/c_proj", MLP),
    ("/transformer/h.0/ln_1/LayerNormalization", "transformer.h", 0,
     "ln_1/LayerNormalization", NORM),
    ("encoder.layer.2.attention.self.query", "encoder.layer", 2, "attention/self/query",
     ATTENTION),
    ("blocks.7.mlp.fc1", "blocks", 7, "mlp/fc1", MLP),
    ("blocks.7.norm1", "blocks", 7, "norm1", NORM),
    # T5: the outermost container is the layer
    ("decoder.block.0.layer.1.DenseReluDense.wi", "decoder.block", 0,
     "layer/1/DenseReluDense/wi", MLP),
])
def test_scope_of_every_naming_style(name, stack, layer, role, module):
    s = scope_of(name)
    assert (s.stack, s.layer, s.role, s.module) == (stack, layer, role, module)


@pytest.mark.parametrize(("name", "module"), [
    ("/model/embed_tokens/Gather", EMBEDDING),
    ("transformer.wte", EMBEDDING),
    ("/lm_head/MatMul", LM_HEAD),
    ("/model/norm/LayerNorm", NORM),
    ("transformer.ln_f", NORM),
    # genai's builder numbers the final norm as a layer past the last one
    ("/model/layers.24/final_norm_layernorm/SkipLayerNorm", NORM),
    ("onnx::MatMul_8761_cast", OTHER),
    ("Constant_12", OTHER),
    # words that only look like containers are not layers
    ("/model/layernorm/Mul", NORM),
    ("/encoder/hidden.3/Add", OTHER),
])
def test_names_without_a_layer_index_stay_ungrouped(name, module):
    s = scope_of(name)
    assert s.layer is None and s.stack == "" and s.module == module


def test_grouping_layers_modules_and_roles():
    names = ["/model/embed_tokens/Gather"]
    for i in range(3):
        names += [f"/model/layers.{i}/input_layernorm/LayerNorm",
                  f"/model/layers.{i}/self_attn/q_proj/MatMul",
                  f"/model/layers.{i}/mlp/up_proj/MatMul",
                  f"/model/layers.{i}/mlp/down_proj/MatMul"]
    names += ["/model/layers.1/mlp/extra/Relu", "/model/norm/LayerNorm", "/lm_head/MatMul"]
    g = group_layers(names)
    assert g.layers() == [("model.layers", 0), ("model.layers", 1), ("model.layers", 2)]
    assert [g.layer_label(k) for k in g.layers()] == ["layer 0", "layer 1", "layer 2"]
    assert [names[i] for i in g.layer_nodes(("model.layers", 1))] == [
        "/model/layers.1/input_layernorm/LayerNorm", "/model/layers.1/self_attn/q_proj/MatMul",
        "/model/layers.1/mlp/up_proj/MatMul", "/model/layers.1/mlp/down_proj/MatMul",
        "/model/layers.1/mlp/extra/Relu"]
    assert g.modules_of(("model.layers", 0)) == [NORM, ATTENTION, MLP]
    assert [names[i] for i in g.module_nodes(("model.layers", 2), MLP)] == [
        "/model/layers.2/mlp/up_proj/MatMul", "/model/layers.2/mlp/down_proj/MatMul"]
    assert [names[i] for i in g.ungrouped()] == [
        "/model/embed_tokens/Gather", "/model/norm/LayerNorm", "/lm_head/MatMul"]
    assert g.modules_of(None) == [EMBEDDING, NORM, LM_HEAD]
    # a role is the same node in every layer: one selection for "every up_proj"
    assert g.role_nodes("mlp/up_proj/MatMul") == [
        f"/model/layers.{i}/mlp/up_proj/MatMul" for i in range(3)]
    assert g.roles() == ["input_layernorm/LayerNorm", "self_attn/q_proj/MatMul",
                         "mlp/up_proj/MatMul", "mlp/down_proj/MatMul"]  # extra/Relu: 1 layer
    assert g.role_nodes("no/such/role") == []
    assert len(g.module_everywhere(MLP)) == 7
    # roles across two stacks (encoder and decoder) are labelled by stack
    two = group_layers(["encoder.layer.0.attention.self.query", "decoder.layers.0.fc1"])
    assert [two.layer_label(k) for k in two.layers()] == ["encoder layer 0", "decoder layer 0"]


def test_totals_by_layer_module_and_role():
    names = ["/model/embed_tokens/Gather", "/lm_head/MatMul"]
    times = {"/model/embed_tokens/Gather": 0.5, "/lm_head/MatMul": 4.0}
    for i in range(3):
        for role, ms in (("self_attn/q_proj/MatMul", 1.0), ("mlp/up_proj/MatMul", 2.0 + i),
                         ("input_layernorm/LayerNorm", None)):
            name = f"/model/layers.{i}/{role}"
            names.append(name)
            times[name] = ms
    g = group_layers(names)
    t = g.totals(times)
    assert t.by_layer == {("model.layers", 0): 3.0, ("model.layers", 1): 4.0,
                          ("model.layers", 2): 5.0}
    assert t.by_layer_module[(("model.layers", 2), MLP)] == 4.0
    assert t.by_layer_module[(("model.layers", 2), NORM)] is None  # never measured
    assert t.by_module == {ATTENTION: 3.0, MLP: 9.0, NORM: None}
    assert t.by_role["mlp/up_proj/MatMul"] == 9.0
    assert t.outside == {EMBEDDING: 0.5, LM_HEAD: 4.0}
    assert t.total == pytest.approx(16.5)
    # by node index too, with the same result
    per_index = [times[n] for n in names]
    assert g.totals(per_index).by_layer == t.by_layer


def test_totals_of_flops_and_bytes_from_a_real_graph():
    model = layered_decoder(layers=3, hidden=16, ffn=32, vocab=40)
    graph = analyze(model, {"batch": 1, "seq": 4})
    g = group_layers(n.name for n in graph.nodes)
    assert len(g.layers()) == 3
    assert all(len(g.layer_nodes(k)) == PER_LAYER for k in g.layers())
    flops = g.totals({n.name: n.flops for n in graph.nodes})
    # MLP of one layer: gate, up (4×16×32 MACs each), down (4×32×16) and the Mul (4×32)
    mlp = 3 * 2 * 4 * 16 * 32 + 4 * 32
    assert flops.by_layer_module[(("model.layers", 1), MLP)] == mlp
    assert len(set(flops.by_layer.values())) == 1  # every layer is the same block
    params = g.totals({n.name: n.param_bytes for n in graph.nodes})
    weights = (3 * 16 * 16 + 3 * 16 * 32 + 4 * 16) * 4  # q, v, o, gate, up, down + 2 norms
    assert params.by_layer[("model.layers", 0)] == weights
    assert params.outside[LM_HEAD] == 16 * 40 * 4


def test_grouping_is_fast_on_a_big_graph():
    names = []
    for i in range(48):
        names += [f"/model/layers.{i}/self_attn/Op_{k}" for k in range(200)]
        names += [f"model.layers.{i}.mlp.proj_{k}" for k in range(20)]
    names += [f"Constant_{k}" for k in range(2000)]
    start = time.perf_counter()
    g = group_layers(names)
    t = g.totals({n: 1.0 for n in names})
    elapsed = time.perf_counter() - start
    assert len(names) > 12000 and len(g.layers()) == 48
    assert t.by_layer[("model.layers", 47)] == 220.0
    assert elapsed < 1.5, elapsed


def _chain(names, extra_edges=()):
    from opstudio.core.model.graph import GraphInfo, NodeInfo

    nodes = [NodeInfo(index=i, name=n, op_type="Relu", domain="", inputs=[f"t{i - 1}"],
                      outputs=[f"t{i}"], output_shapes=[[1]], flops=10, param_bytes=4)
             for i, n in enumerate(names)]
    edges = [(i - 1, i, f"t{i - 1}") for i in range(1, len(names))] + list(extra_edges)
    return GraphInfo(nodes=nodes, edges=edges, inputs=[], outputs=[], tensors={}, opset=17,
                     ir_version=8, producer="test")


def test_collapse_folds_a_layer_into_one_node():
    from opstudio.core.model.layers import collapse_layers

    graph = analyze(layered_decoder(layers=3), {"batch": 1, "seq": 4})
    g = group_layers(n.name for n in graph.nodes)
    c = collapse_layers(graph, g, [("model.layers", 1)])
    assert len(c.graph.nodes) == len(graph.nodes) - PER_LAYER + 1
    (box, key), = c.layers.items()
    assert key == ("model.layers", 1) and c.keys == {key}
    folded = c.graph.nodes[box]
    assert (folded.op_type, folded.name) == ("layer 1", f"{PER_LAYER} operators")
    inner = g.layer_nodes(key)
    assert c.members[box].tolist() == inner and set(c.box_of[inner].tolist()) == {box}
    assert folded.flops == sum(graph.nodes[i].flops for i in inner)
    # edges: none inside the box, one per pair of boxes, and the graph stays connected
    pairs = [(a, b) for a, b, _ in c.graph.edges]
    assert len(pairs) == len(set(pairs)) and all(a != b for a, b in pairs)
    into = {a for a, b in pairs if b == box}
    out_of = {b for a, b in pairs if a == box}
    assert [c.graph.nodes[a].name for a in into] == ["/model/layers.0/Add_1"]
    assert {c.graph.nodes[b].name for b in out_of} == {
        "/model/layers.2/input_layernorm/LayerNorm", "/model/layers.2/Add"}
    # every node is in exactly one box
    assert sorted(i for m in c.members for i in m.tolist()) == list(range(len(graph.nodes)))


def test_a_layer_a_path_leaves_and_reenters_stays_open():
    from opstudio.core.model.layers import collapse_layers

    # layers.1/a → outside → layers.1/b: as one box, the layer would feed itself
    graph = _chain(["/model/layers.0/x", "/model/layers.1/a", "helper",
                    "/model/layers.1/b", "/model/layers.2/y"])
    g = group_layers(n.name for n in graph.nodes)
    c = collapse_layers(graph, g, g.layers())
    assert c.keys == {("model.layers", 0), ("model.layers", 2)}
    assert len(c.graph.nodes) == 5  # two folded layers of one node each, the rest open


def test_sums_with_an_unknown_member_are_unknown_when_every_node_counts():
    names = ["/model/layers.0/w/Cast", "/model/layers.0/q_proj/MatMul",
             "/model/layers.1/w/Cast", "/model/layers.1/q_proj/MatMul", "/lm_head/MatMul"]
    flops = [0, None, 0, 8.0, None]  # a Cast costs nothing; a MatMul over an unbound dim: ?
    g = group_layers(names)
    loose = g.totals(flops)
    assert loose.by_layer[("model.layers", 0)] == 0  # the misleading 0 of a partial sum
    strict = g.totals(flops, every_node=True)
    assert strict.by_layer == {("model.layers", 0): None, ("model.layers", 1): 8.0}
    assert strict.by_role == {"w/Cast": 0, "q_proj/MatMul": None}
    assert strict.by_module == {ATTENTION: None, "other": 0}
    assert strict.outside == {LM_HEAD: None}
    assert strict.total is None
    assert g.totals([0, 1.0, 0, 8.0, 2.0], every_node=True).total == 11.0


def test_folded_layers_show_no_flops_while_dims_are_missing():
    from opstudio.core.model.layers import collapse_layers

    model = layered_decoder(layers=2)
    for dims, known in (({"batch": 1}, False), ({"batch": 1, "seq": 4}, True)):
        graph = analyze(model, dims)
        assert graph.sums_need_every_node() is not known
        assert graph.unbound_dims() == ([] if known else ["seq"])
        g = group_layers(n.name for n in graph.nodes)
        c = collapse_layers(graph, g, g.layers())
        for box, key in c.layers.items():
            inner = [graph.nodes[i].flops for i in g.layer_nodes(key)]
            assert (None in inner) is not known
            assert c.graph.nodes[box].flops == (sum(inner) if known else None)
