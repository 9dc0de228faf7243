"""Mutated model files: the loader, the analysis and ``inspect`` end in a result or one clear error.

A bounded property test (hypothesis) for the suite; ``benchmarks/fuzz_loader.py`` runs the long
version against the demo and real models.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from opstudio.cli import main
from opstudio.core.errors import OpstudioError
from opstudio.core.model.graph import analyze
from opstudio.core.model.model_io import load_model


def seed_model() -> bytes:
    """Small but varied: Conv, MatMul, Reshape with a constant shape, a Constant node, an If."""
    rng = np.random.default_rng(0)
    then_g = helper.make_graph([helper.make_node("Relu", ["y"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["y"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["cs"], name="shape"),
        helper.make_node("Reshape", ["c", "flat"], ["f"], name="flatten"),
        helper.make_node("Constant", [], ["w"], name="const",
                         value=numpy_helper.from_array(rng.standard_normal((128, 4)).astype(np.float32))),
        helper.make_node("MatMul", ["f", "w"], ["y"], name="mm"),
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then_g,
                         else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes, "seed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 8, 8]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), "k"),
         numpy_helper.from_array(np.asarray([-1, 128], np.int64), "flat")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


SEED = seed_model()
# hypothesis runs many examples per test call, so one scratch folder serves them all
WORKDIR = Path(tempfile.mkdtemp(prefix="opstudio-fuzz-test-"))
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)

# One mutation = (kind, position as a fraction of the length, payload).
mutation = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]),
    st.floats(min_value=0, max_value=1, allow_nan=False),
    st.binary(min_size=1, max_size=12),
)


def mutate(data: bytes, ops: list[tuple[str, float, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, where, payload in ops:
        if not buf:
            break
        pos = min(int(where * len(buf)), len(buf) - 1)
        if kind == "flip":
            buf[pos] ^= 1 << (payload[0] % 8)
        elif kind == "set":
            buf[pos] = payload[0]
        elif kind == "insert":
            buf[pos:pos] = payload
        elif kind == "delete":
            del buf[pos:pos + 1 + payload[0] % 32]
        elif kind == "truncate":
            del buf[pos:]
        else:
            src = int(payload[0] / 256 * len(buf))
            buf[pos:pos] = buf[src:src + 1 + payload[-1] % 64]
    return bytes(buf)


def write_case(data: bytes) -> Path:
    path = WORKDIR / "case.onnx"
    path.write_bytes(data)
    return path


FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def test_seed_model_is_analysed():
    info = analyze(load_model(write_case(SEED)), {"batch": 1})
    assert info.node("mm").flops == 2 * 4 * 128
    assert info.node("branch").subgraph_nodes == 2


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=6))
def test_mutated_bytes_load_and_analyse_or_fail_clearly(ops):
    path = write_case(mutate(SEED, ops))
    try:
        model = load_model(path)
        info = analyze(model, {"batch": 2})
    except OpstudioError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert len(info.nodes) == len(model.graph.node)
    assert len({n.name for n in info.nodes}) == len(info.nodes)


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=6))
def test_mutated_bytes_through_inspect(ops):
    path = write_case(mutate(SEED, ops))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["inspect", str(path), "--dim", "batch=1"])
    assert code in (0, 1)
    if code == 1:
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert not lines[0].startswith("error: unexpected"), lines[0]
    else:
        assert "operators" in out.getvalue()


@pytest.mark.parametrize("keep", range(0, len(SEED), max(1, len(SEED) // 60)))
def test_every_truncation_point(keep):
    path = write_case(SEED[:keep])
    with contextlib.suppress(OpstudioError):
        analyze(load_model(path))
