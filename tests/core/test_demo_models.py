"""The bundled demo models: reproducible, valid, the specified architecture, and runnable."""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import demo_builders as demo
from opstudio.core.model.graph import analyze
from opstudio.core.model.model_io import load_model

RESOURCES = Path(__file__).resolve().parents[2] / "resources"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_demo_models",
                                                  RESOURCES / "make_demo_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_demo = _load_script()  # writes the files; the builders and their sizes are in ``demo``


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("demo")
    return {p.name: p for p in make_demo.build_all(out)}


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_rebuild_is_byte_identical(built, tmp_path):
    again = {p.name: p for p in make_demo.build_all(tmp_path)}
    assert set(again) == {"article_cnn.onnx", "tiny_llm.onnx"}
    for name, path in again.items():
        assert path.read_bytes() == built[name].read_bytes(), name


@pytest.mark.parametrize("name", ["article_cnn.onnx", "tiny_llm.onnx"])
def test_committed_file_equals_fresh_build(built, name):
    committed = RESOURCES / name
    assert committed.is_file(), f"{committed} missing: run resources/make_demo_models.py"
    assert committed.read_bytes() == built[name].read_bytes(), (
        f"{name} differs from a fresh build: run resources/make_demo_models.py")
    assert committed.stat().st_size < 10 * 2**20


@pytest.mark.parametrize("name", ["article_cnn.onnx", "tiny_llm.onnx"])
def test_passes_full_check(built, name):
    onnx.checker.check_model(str(built[name]), full_check=True)


def test_cnn_op_sequence_and_shapes(built):
    model = onnx.load(str(built["article_cnn.onnx"]))
    assert [(n.name, n.op_type) for n in model.graph.node] == [
        ("conv1", "Conv"), ("relu1", "Relu"), ("pool1", "MaxPool"),
        ("conv2", "Conv"), ("relu2", "Relu"), ("pool2", "MaxPool"),
        ("conv3", "Conv"), ("relu3", "Relu"), ("flatten", "Flatten"),
        ("fc1", "Gemm"), ("relu4", "Relu"), ("fc2", "Gemm")]
    w = _weights(built["article_cnn.onnx"])
    assert w["conv1.weight"].shape == (32, 1, 3, 3)
    assert w["conv2.weight"].shape == (64, 32, 3, 3)
    assert w["conv3.weight"].shape == (64, 64, 3, 3)
    assert w["fc1.weight"].shape == (64, 576)
    assert w["fc2.weight"].shape == (10, 64)
    # He init: std close to sqrt(2 / fan_in)
    assert w["conv3.weight"].std() == pytest.approx(math.sqrt(2 / 576), rel=0.1)

    info = analyze(model, {"batch": 1})
    shapes = {n.name: n.output_shapes[0] for n in info.nodes}
    assert shapes["conv1"] == [1, 32, 26, 26]
    assert shapes["pool1"] == [1, 32, 13, 13]
    assert shapes["pool2"] == [1, 64, 5, 5]
    assert shapes["conv3"] == [1, 64, 3, 3]
    assert shapes["fc2"] == [1, 10]
    assert info.node("conv2").flops == 2 * (64 * 11 * 11) * (32 * 9) + 64 * 11 * 11


def test_cnn_matches_numpy_reference(built):
    w = _weights(built["article_cnn.onnx"])
    x = np.random.default_rng(3).standard_normal((2, 1, 28, 28)).astype(np.float32)

    def conv(t, k, b):
        windows = np.lib.stride_tricks.sliding_window_view(t, (3, 3), axis=(2, 3))
        return np.einsum("nchwij,ocij->nohw", windows, k) + b[None, :, None, None]

    def pool(t):
        n, c, h, wd = t.shape
        t = t[:, :, : h // 2 * 2, : wd // 2 * 2]
        return t.reshape(n, c, h // 2, 2, wd // 2, 2).max(axis=(3, 5))

    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    t = pool(relu(conv(x, w["conv1.weight"], w["conv1.bias"])))
    t = pool(relu(conv(t, w["conv2.weight"], w["conv2.bias"])))
    t = relu(conv(t, w["conv3.weight"], w["conv3.bias"])).reshape(2, -1)
    t = relu(t @ w["fc1.weight"].T + w["fc1.bias"])
    expected = t @ w["fc2.weight"].T + w["fc2.bias"]
    got = _session(built["article_cnn.onnx"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_llm_op_mix_and_names(built):
    model = onnx.load(str(built["tiny_llm.onnx"]))
    ops = Counter(n.op_type for n in model.graph.node)
    # per block: qkv, scores, context, out_proj, fc1, fc2 = 6 MatMul; plus lm_head
    assert ops["MatMul"] == 6 * demo.N_LAYERS + 1
    assert ops["LayerNormalization"] == 2 * demo.N_LAYERS + 1
    assert ops["Softmax"] == demo.N_LAYERS
    assert ops["Erf"] == demo.N_LAYERS
    assert ops["Gather"] >= 2
    names = {n.name: n.op_type for n in model.graph.node}
    assert names["embed.tokens"] == "Gather"
    assert names["embed.positions"] == "Gather"
    for i in range(demo.N_LAYERS):
        assert names[f"block{i}.ln1"] == "LayerNormalization"
        assert names[f"block{i}.attn.qkv"] == "MatMul"
        assert names[f"block{i}.attn.softmax"] == "Softmax"
        assert names[f"block{i}.attn.out_proj"] == "MatMul"
        assert names[f"block{i}.mlp.fc1"] == "MatMul"
        assert names[f"block{i}.mlp.fc2"] == "MatMul"
    assert names["lm_head"] == "MatMul"
    assert len(names) == len(model.graph.node)  # names are unique
    (inp,) = model.graph.input
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in out_dims] == ["batch", "seq", demo.VOCAB]
    w = _weights(built["tiny_llm.onnx"])
    assert np.all(w["block0.ln1.weight"] == 1.0)
    assert w["block0.mlp.fc1.weight"].shape == (demo.D_MODEL, 4 * demo.D_MODEL)
    assert w["block0.attn.qkv.weight"].std() == pytest.approx(0.02, rel=0.05)


def test_llm_symbolic_dims_and_flops(built):
    model = load_model(built["tiny_llm.onnx"])
    info = analyze(model)
    assert info.node("block0.attn.qkv").output_shapes[0] == ["batch", "seq", 3 * demo.D_MODEL]
    assert info.node("block0.attn.qkv").flops is None  # symbolic until bound
    bound = analyze(model, {"batch": 1, "seq": 128})
    d = demo.D_MODEL
    assert bound.node("block0.attn.qkv").flops == 2 * 128 * d * 3 * d
    assert bound.node("block0.attn.scores").flops == 2 * demo.N_HEADS * 128 * 128 * (d // 4)
    assert bound.node("lm_head").flops == 2 * 128 * d * demo.VOCAB
    for n in bound.nodes:
        if n.op_type == "MatMul":
            assert n.flops is not None and n.flops > 0, n.name


def _llm_reference(w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    from math import erf

    verf = np.vectorize(erf)
    d, h = demo.D_MODEL, demo.N_HEADS
    hd = d // h
    seq = ids.shape[1]

    def ln(t, name):
        mu = t.mean(-1, keepdims=True)
        var = ((t - mu) ** 2).mean(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + demo.LN_EPS) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def lin(t, name):
        return t @ w[f"{name}.weight"] + w[f"{name}.bias"]

    x = (w["embed.tokens.weight"][ids] + w["embed.positions.weight"][:seq]).astype(np.float64)
    mask = np.triu(np.full((seq, seq), demo.MASK_VALUE), k=1)
    for i in range(demo.N_LAYERS):
        p = f"block{i}"
        q, k, v = np.split(lin(ln(x, f"{p}.ln1"), f"{p}.attn.qkv"), 3, axis=-1)
        split = lambda t: t.reshape(t.shape[0], seq, h, hd).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(0, 2, 1, 3).reshape(ids.shape[0], seq, d)
        x = x + lin(ctx, f"{p}.attn.out_proj")
        m = lin(ln(x, f"{p}.ln2"), f"{p}.mlp.fc1")
        m = 0.5 * m * (1 + verf(m / math.sqrt(2)))
        x = x + lin(m, f"{p}.mlp.fc2")
    return ln(x, "final_ln") @ w["lm_head.weight"]


@pytest.mark.parametrize("seq", [16, 128])
def test_llm_runs_in_onnxruntime_and_matches_reference(built, seq):
    ids = np.random.default_rng(seq).integers(0, demo.VOCAB, (1, seq), dtype=np.int64)
    (logits,) = _session(built["tiny_llm.onnx"]).run(None, {"input_ids": ids})
    assert logits.shape == (1, seq, demo.VOCAB)
    expected = _llm_reference(_weights(built["tiny_llm.onnx"]), ids)
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-4)


def test_llm_is_causal(built):
    sess = _session(built["tiny_llm.onnx"])
    ids = np.random.default_rng(7).integers(0, demo.VOCAB, (1, 16), dtype=np.int64)
    changed = ids.copy()
    changed[0, 10] = (changed[0, 10] + 1) % demo.VOCAB
    a = sess.run(None, {"input_ids": ids})[0]
    b = sess.run(None, {"input_ids": changed})[0]
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-3
