"""compare maps an AFTER made by another tool (no provenance) onto BEFORE's nodes: by the weight
each node reads, else by its name stem; what has no counterpart is removed or added, not 0 ms."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.measure.compare import compare_models, map_nodes, match_nodes
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.plan import report
from profile_builders import node_stats, profile_of

DIM = 64


def before_model() -> onnx.ModelProto:
    """x → mm0 → relu0 → mm1 → tanh0 → y, 64-wide weights."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(DIM, DIM)).astype(np.float32) / 8
    w1 = rng.normal(size=(DIM, DIM)).astype(np.float32) / 8
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"], name="mm0"),
             helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "W1"], ["h1"], name="mm1"),
             helper.make_node("Tanh", ["h1"], ["y"], name="tanh0")]
    graph = helper.make_graph(
        nodes, "before", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", DIM])],
        [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(w1, "W1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def after_model() -> onnx.ModelProto:
    """BEFORE as another tool would rewrite it: tanh0 dropped, a Sigmoid added, both MatMuls
    quantized by onnxruntime's MatMulNBits quantizer (``mm0_Q4`` reading ``W0_Q4``…); then one
    renamed beyond recognition (found by its weight) and the other's weights renamed (found by
    its name)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = before_model()
    g = model.graph
    tanh = next(n for n in g.node if n.name == "tanh0")
    g.node.remove(tanh)
    g.node.append(helper.make_node("Sigmoid", ["h1"], ["y"], name="post_sigmoid"))
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4,
                                          bits=4, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    model = quantizer.model.model
    ops = {n.name: n.op_type for n in model.graph.node}
    assert ops["mm0_Q4"] == ops["mm1_Q4"] == "MatMulNBits"  # what the quantizer does
    renames = {"W0_Q4": "packed_a", "W0_scales": "scales_a"}
    for t in model.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for n in model.graph.node:
        n.input[:] = [renames.get(i, i) for i in n.input]
        if n.name == "mm1_Q4":
            n.name = "fused_projection"
    return model


def test_map_nodes_by_weight_then_name_stem():
    m = map_nodes(before_model(), after_model())
    assert m.origins["relu0"] == ["relu0"] and m.how["relu0"] == "same"
    assert m.origins["fused_projection"] == ["mm1"] and m.how["fused_projection"] == "weight"
    assert m.origins["mm0_Q4"] == ["mm0"] and m.how["mm0_Q4"] == "name"
    assert m.removed == ["tanh0"] and m.added == ["post_sigmoid"]


def test_provenance_comes_first():
    before, after = before_model(), after_model()
    node = next(n for n in after.graph.node if n.name == "mm0_Q4")
    entry = node.metadata_props.add()
    entry.key, entry.value = "opstudio.origin", "mm1"  # provenance says otherwise: believed
    m = map_nodes(before, after)
    assert m.origins["mm0_Q4"] == ["mm1"] and m.how["mm0_Q4"] == "provenance"
    assert "mm0" in m.removed


def test_weights_behind_cast_and_a_kept_tied_embedding():
    """lm_head reads the embedding through Transpose (fp16 storage behind Cast); AFTER keeps the
    embedding's Gather and replaces lm_head with a node reading ``emb_Q4``: the Gather, still
    there, must not take it, and the Cast/Transpose are storage, not readers."""
    vocab, hidden = 32, 16
    emb = numpy_helper.from_array(np.zeros((vocab, hidden), np.float16), "emb")
    before = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["emb"], ["emb32"], to=TensorProto.FLOAT, name="emb_cast"),
         helper.make_node("Gather", ["emb32", "ids"], ["h"], name="embed"),
         helper.make_node("Transpose", ["emb32"], ["embT"], perm=[1, 0], name="tie"),
         helper.make_node("MatMul", ["h", "embT"], ["logits"], name="lm_head")],
        "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, vocab])], [emb]))
    after = onnx.ModelProto()
    after.CopyFrom(before)
    del after.graph.node[2:]
    after.graph.initializer.append(numpy_helper.from_array(
        np.zeros((vocab, hidden // 2), np.uint8), "emb_Q4"))
    after.graph.node.append(helper.make_node("MatMulNBits", ["h", "emb_Q4"], ["logits"],
                                             name="head", domain="com.microsoft"))
    m = map_nodes(before, after)
    assert m.origins["head"] == ["lm_head"] and m.how["head"] == "weight"
    assert m.origins["embed"] == ["embed"] and m.removed == ["tie"]
    # both readers replaced, as onnxruntime-genai's int4 does (GatherBlockQuantized + MatMulNBits
    # on one quantized tensor): each goes to the original whose op it extends
    del after.graph.node[1]
    after.graph.node.append(helper.make_node(
        "GatherBlockQuantized", ["emb_Q4", "ids", "emb_scales"], ["h"], name="lookup",
        domain="com.microsoft"))
    m = map_nodes(before, after)
    assert m.origins["head"] == ["lm_head"] and m.origins["lookup"] == ["embed"]
    assert m.how["lookup"] == "weight" and m.added == []


def stats(name, ms, op="MatMul"):
    return node_stats(name, ms, op)


def test_match_rows_with_the_mapping():
    before = profile_of(stats("mm0", 2.0), stats("relu0", 0.2, "Relu"), stats("mm1", 2.0),
                        stats("tanh0", 0.3, "Tanh"))
    after = profile_of(stats("mm0_Q4", 0.5, "MatMulNBits"), stats("relu0", 0.2, "Relu"),
                       stats("fused_projection", 1.0, "MatMulNBits"),
                       stats("post_sigmoid", 0.1, "Sigmoid"))
    unmapped = {r.name: r for r in match_nodes(before, after)}
    assert unmapped["mm0"].after_ms is None and unmapped["mm0_Q4"].before_ms is None
    rows = {r.name: r for r in match_nodes(before, after, map_nodes(before_model(),
                                                                    after_model()))}
    assert set(rows) == {"mm0", "mm1", "relu0", "tanh0", "post_sigmoid"}
    assert rows["mm0"].status == "mapped" and rows["mm0"].after_names == ["mm0_Q4"]
    assert rows["mm0"].after_ms == pytest.approx(0.5) and rows["mm0"].speedup == pytest.approx(4)
    assert rows["mm1"].after_ms == pytest.approx(1.0) and rows["mm1"].op_type == "MatMul"
    assert rows["relu0"].status == "same" and rows["relu0"].speedup == pytest.approx(1.0)
    assert rows["tanh0"].status == "removed" and rows["tanh0"].after_ms is None
    assert rows["tanh0"].speedup is None and rows["tanh0"].to_json()["after_ms"] is None
    assert rows["post_sigmoid"].status == "added" and rows["post_sigmoid"].before_ms is None


def test_compare_profiles_renamed_nodes_against_their_originals(tmp_path):
    b, a = tmp_path / "before.onnx", tmp_path / "after.onnx"
    onnx.save(before_model(), b)
    onnx.save(after_model(), a)
    settings = ProfileSettings(runs=3, warmup=1, threads=1, dims={"batch": 16},
                               measure_plain=False)
    c = compare_models(b, a, settings)
    rows = {r.name: r for r in c.nodes}
    for name, after_name in (("mm0", "mm0_Q4"), ("mm1", "fused_projection")):
        row = rows[name]
        assert row.status == "mapped" and row.after_names == [after_name]
        assert row.before_ms > 0 and row.after_ms > 0 and row.speedup is not None
    assert "mm0_Q4" not in rows and "fused_projection" not in rows
    assert rows["tanh0"].status == "removed" and rows["tanh0"].after_ms is None
    assert rows["post_sigmoid"].status == "added" and rows["post_sigmoid"].before_ms is None
    assert c.changes() == {"mapped": 2, "removed": 1, "added": 1, "fused": 0, "kernels": 0}
    data = json.loads(json.dumps(c.to_json(), allow_nan=False))
    by_name = {n["name"]: n for n in data["nodes"]}
    assert by_name["tanh0"]["after_ms"] is None and by_name["tanh0"]["status"] == "removed"
    assert by_name["mm0"]["after_names"] == ["mm0_Q4"]
    assert data["node_changes"]["mapped"] == 2
    page = report.render_html(c)
    assert "removed" in page and "added" in page and "mm0_Q4" in page
    csv_rows = report.nodes_csv(c).splitlines()
    assert any(r.startswith("tanh0,Tanh,") and ",removed" in r for r in csv_rows)


def test_before_rows_named_by_provenance():
    """BEFORE itself optimized by opstudio: its rows carry original names ("layer_mm" for node
    mm0); AFTER's renamed node still lands on that row."""
    before = before_model()
    for node in before.graph.node:
        if node.name in ("mm0", "tanh0"):
            entry = node.metadata_props.add()
            entry.key, entry.value = "opstudio.origin", {"mm0": "layer_mm", "tanh0": "act"}[
                node.name]
    rows = {r.name: r for r in match_nodes(
        profile_of(stats("layer_mm", 2.0), stats("act", 0.3, "Tanh")),
        profile_of(stats("mm0_Q4", 0.5, "MatMulNBits")),
        map_nodes(before, after_model()))}
    assert rows["layer_mm"].status == "mapped" and rows["layer_mm"].after_ms == pytest.approx(0.5)
    assert rows["act"].status == "removed" and rows["act"].after_ms is None
    assert "mm0_Q4" not in rows
