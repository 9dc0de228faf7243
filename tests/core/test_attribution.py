"""Kernels of onnxruntime's rewritten graph mapped back to the nodes of the original model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.measure.attribution import attribute
from opstudio.core.measure.inputs import make_inputs
from opstudio.core.model.provenance import set_origin

RNG = np.random.default_rng(0)


def _w(name, shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def run_ort(model: onnx.ModelProto, tmp: Path, level: str = "all"):
    """Kernels (name -> op) of one profiled run, and the graph onnxruntime ran."""
    path = tmp / "m.onnx"
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / "prof")
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    so.optimized_model_filepath = str(tmp / "opt.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, make_inputs(model))
    trace = json.loads(Path(sess.end_profiling()).read_text())
    kernels = {e["name"][: -len("_kernel_time")]: e["args"]["op_name"] for e in trace
               if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}
    return kernels, onnx.load(str(tmp / "opt.onnx"), load_external_data=False)


def _mm_add_relu(rows=1):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t"], name="mm0"),
             helper.make_node("Add", ["t", "B"], ["t2"], name="add0"),
             helper.make_node("Relu", ["t2"], ["y"], name="relu0")]
    return _model(nodes, [_vi("x", [rows, 32])], [_vi("y", [rows, 32])],
                  [_w("W", (32, 32)), _w("B", (32,))])


def test_fused_matmul_add_relu_is_one_group(tmp_path):
    kernels, opt = run_ort(_mm_add_relu(), tmp_path)
    assert list(kernels) == ["fused mm0/MatMulAddFusion"]  # what onnxruntime 1.32 calls it
    a = attribute(_mm_add_relu(), kernels, opt)
    assert a.method == "optimized graph" and not a.unattributed
    (g,) = a.groups
    assert g.name == "mm0" and g.op_type == "MatMul"
    assert g.members == ["mm0", "add0", "relu0"]
    assert g.kernels == ["fused mm0/MatMulAddFusion"]


def test_3d_gemm_with_inserted_reshapes(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t"], name="mm0"),
             helper.make_node("Add", ["t", "B"], ["y"], name="add0")]
    m = _model(nodes, [_vi("x", [2, 4, 32])], [_vi("y", [2, 4, 32])],
               [_w("W", (32, 32)), _w("B", (32,))])
    kernels, opt = run_ort(m, tmp_path)
    assert len(kernels) == 3  # Reshape, Gemm, Reshape
    a = attribute(m, kernels, opt)
    assert not a.unattributed
    (g,) = a.groups
    assert g.name == "mm0" and set(g.members) == {"mm0", "add0"}
    assert sorted(g.kernels) == sorted(kernels)


def test_nchwc_convs_map_to_their_conv_relu_pairs(tmp_path):
    nodes, inits, x, c = [], [], "x", 3
    for i in range(3):
        inits += [_w(f"W{i}", (16, c, 3, 3)), _w(f"B{i}", (16,))]
        nodes += [helper.make_node("Conv", [x, f"W{i}", f"B{i}"], [f"c{i}"], name=f"conv{i}",
                                   pads=[1, 1, 1, 1]),
                  # output tensor named like its node: the NCHWc kernel is then "relu0_nchwc"
                  helper.make_node("Relu", [f"c{i}"], [f"relu{i}"], name=f"relu{i}")]
        x, c = f"relu{i}", 16
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"], name="gap"))
    m = _model(nodes, [_vi("x", [1, 3, 16, 16])], [_vi("y", [1, 16, 1, 1])], inits)
    kernels, opt = run_ort(m, tmp_path)
    a = attribute(m, kernels, opt)
    assert not a.unattributed
    by_name = {g.name: g for g in a.groups}
    for i in range(3):
        assert by_name[f"conv{i}"].members == [f"conv{i}", f"relu{i}"]
        assert by_name[f"conv{i}"].op_type == "Conv"
    # Inserted layout kernels are charged to a neighbour, never lost.
    assert sum(len(g.kernels) for g in a.groups) == len(kernels)
    members = [n for g in a.groups for n in g.members]
    assert len(members) == len(set(members)) == 7


def test_gelu_and_layernorm_fusions_keep_their_nodes(tmp_path):
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1,8,16] x) => (float[1,8,16] y) {
      mean = ReduceMean<axes=[-1]>(x)
      d = Sub(x, mean)
      two = Constant<value=float {2.0}>()
      p = Pow(d, two)
      var = ReduceMean<axes=[-1]>(p)
      eps = Constant<value=float {1e-5}>()
      ve = Add(var, eps)
      sd = Sqrt(ve)
      ln = Div(d, sd)
      s2 = Constant<value=float {1.4142135}>()
      q = Div(ln, s2)
      e = Erf(q)
      one = Constant<value=float {1.0}>()
      e1 = Add(e, one)
      h = Mul(ln, e1)
      half = Constant<value=float {0.5}>()
      y = Mul(h, half)
    }""")
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}_{node.op_type}"
    kernels, opt = run_ort(model, tmp_path)
    assert "Gelu" in kernels  # the fused node carries none of the original names
    a = attribute(model, kernels, opt)
    assert not a.unattributed
    gelu = a.group_of("Gelu")
    assert gelu is not None and "n11_Erf" in gelu.members and "n16_Mul" in gelu.members
    assert "n0_ReduceMean" not in gelu.members
    members = [n for g in a.groups for n in g.members]
    assert len(members) == len(set(members))


def test_provenance_reports_pass_output_against_the_original_node(tmp_path):
    # What a low-rank pass leaves: mm0 became two MatMuls that both record mm0.
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="mm0_lowrank_a"),
             helper.make_node("MatMul", ["h", "Bm"], ["t"], name="mm0_lowrank_b"),
             helper.make_node("Relu", ["t"], ["y"], name="relu0")]
    set_origin(nodes[0], ["mm0"])
    set_origin(nodes[1], ["mm0"])
    m = _model(nodes, [_vi("x", [4, 64])], [_vi("y", [4, 64])],
               [_w("A", (64, 8)), _w("Bm", (8, 64))])
    kernels, opt = run_ort(m, tmp_path, level="disable")
    a = attribute(m, kernels, opt)
    names = sorted(g.name for g in a.groups)
    assert names == ["mm0", "relu0"]
    mm0 = next(g for g in a.groups if g.name == "mm0")
    assert sorted(mm0.kernels) == ["mm0_lowrank_a", "mm0_lowrank_b"]
    assert mm0.op_type == "MatMul" and mm0.members == ["mm0"]


def test_quantize_dynamic_kernels_go_back_to_the_original_matmul(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm0")]
    src = tmp_path / "fp32.onnx"
    onnx.save(_model(nodes, [_vi("x", [4, 64])], [_vi("y", [4, 64])], [_w("W", (64, 64))]),
              str(src))
    dst = tmp_path / "int8.onnx"
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    q = onnx.load(str(dst))
    work = tmp_path / "run"
    work.mkdir()

    kernels, opt = run_ort(q, work)
    assert list(kernels) == ["mm0_quant"]  # DynamicQuantizeMatMul after onnxruntime's fusions
    plain = attribute(q, kernels, opt)
    assert plain.groups[0].name == "mm0_quant"  # without provenance: the kernel's own node
    assert "x_QuantizeLinear" in plain.groups[0].members

    for node in q.graph.node:  # as opstudio's int8 pass records it
        set_origin(node, ["mm0"])
    a = attribute(q, kernels, opt)
    assert [(g.name, g.members, g.kernels) for g in a.groups] == [("mm0", ["mm0"], ["mm0_quant"])]
    assert a.groups[0].op_type == "MatMulInteger"  # the node that does mm0's work


def test_names_only_fallback_and_unattributed():
    m = _mm_add_relu()
    kernels = {"fused mm0/MatMulAddFusion": "FusedGemm", "relu0": "Relu",
               "t_token_3": "Identity", "MemcpyToHost": "MemcpyToHost"}
    a = attribute(m, kernels, optimized=None, weights={"relu0": 5.0})
    assert a.method == "names"
    assert a.group_of("fused mm0/MatMulAddFusion").name == "mm0"
    assert a.group_of("t_token_3").name == "mm0"  # tensor t is mm0's output
    assert a.group_of("relu0").name == "relu0"
    assert a.unattributed == ["MemcpyToHost"]


def test_qdq_conv_and_pool_keep_separate_rows(tmp_path):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter([{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)}
                              for _ in range(2)])

        def get_next(self):
            return next(self.data, None)

    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["y"], name="pool0", kernel_shape=[2, 2],
                              strides=[2, 2])]
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(_model(nodes, [_vi("x", [1, 8, 16, 16])], [_vi("y", [1, 16, 8, 8])],
                     [_w("W", (16, 8, 3, 3)), _w("B", (16,))]), str(src))
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    q = onnx.load(str(dst))
    work = tmp_path / "run"
    work.mkdir()
    kernels, opt = run_ort(q, work)
    a = attribute(q, kernels, opt)
    assert not a.unattributed
    conv, pool = a.group_of(next(k for k in kernels if k.startswith("conv0"))), \
        a.group_of(next(k for k in kernels if k.startswith("pool0")))
    assert conv.name == "conv0" and pool.name == "pool0" and conv is not pool
    members = [n for g in a.groups for n in g.members]
    assert len(members) == len(set(members))
    assert sum(len(g.kernels) for g in a.groups) == len(kernels)
