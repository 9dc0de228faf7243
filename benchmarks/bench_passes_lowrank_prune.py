"""Per-node latency of low-rank factorization and pruning, measured with onnxruntime on CPU.

Each case is a small model holding the node(s) of a GPT-2-small-sized block (d=768, MLP 3072,
seq 128) or a ResNet-like CNN block (56×56), with random weights. The model is rewritten by the
``lowrank`` / ``prune`` passes and both versions are timed with plain ``session.run`` (median
over many runs after warm-up, before and after runs interleaved so background load hits both)
with one intra-op thread and with onnxruntime's default. The relative error is
||y_after − y_before|| / ||y_before|| on one random input. "speedup" is the ratio of medians,
"by min" the ratio of the fastest runs (steadier when other work shares the CPU).

Random Gaussian weights have a flat singular spectrum, the worst case for a low rank: trained
weights usually keep far more energy at the same rank, so read the errors as upper bounds.

    python benchmarks/bench_passes_lowrank_prune.py [--budget 0.6] [--threads 1 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from opstudio.core.passes import PassContext
from opstudio.core.passes.lowrank import PASS as LOWRANK
from opstudio.core.passes.prune import PASS as PRUNE

RNG = np.random.default_rng(0)


def weight(*shape: int) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
    return (RNG.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def model_of(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info(n, 1, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, 1, s) for n, s in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model, full_check=True)
    return model


def linear(k: int, n: int, seq: int = 128) -> onnx.ModelProto:
    """One GPT-2 projection: x[seq, k] · W[k, n] (the node measured)."""
    return model_of([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
                    [("x", [seq, k])], [("y", [seq, n])], {"W": weight(k, n)})


def mlp(d: int = 768, hidden: int = 3072, seq: int = 128) -> onnx.ModelProto:
    """fc1 → bias → Gelu → fc2: structured pruning of fc1 also shrinks fc2."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Gelu", ["hb"], ["g"], name="gelu"),
             helper.make_node("MatMul", ["g", "W2"], ["y"], name="fc2")]
    inits = {"W1": weight(d, hidden), "b1": weight(hidden), "W2": weight(hidden, d)}
    return model_of(nodes, [("x", [seq, d])], [("y", [seq, d])], inits)


def conv(c_in: int, c_out: int, k: int, size: int = 56) -> onnx.ModelProto:
    pad = k // 2
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], name="fc", pads=[pad] * 4)
    return model_of([node], [("x", [1, c_in, size, size])], [("y", [1, c_out, size, size])],
                    {"W": weight(c_out, c_in, k, k), "b": weight(c_out)})


def conv_block(c: int = 64, size: int = 56) -> onnx.ModelProto:
    """conv3×3 → BN → Relu → conv3×3, as in a ResNet basic block (without the shortcut)."""
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="fc", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c1", "s", "bb", "mu", "var"], ["n1"],
                              name="bn"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "W2", "b2"], ["y"], name="conv2", pads=[1] * 4)]
    inits = {"W1": weight(c, c, 3, 3), "s": 1 + 0.1 * weight(c), "bb": weight(c),
             "mu": weight(c), "var": 1 + np.abs(weight(c)), "W2": weight(c, c, 3, 3),
             "b2": weight(c)}
    return model_of(nodes, [("x", [1, c, size, size])], [("y", [1, c, size, size])], inits)


def median_ms(models: list[onnx.ModelProto], feeds: dict[str, np.ndarray], threads: int,
              budget: float) -> list[tuple[float, float]]:
    """(median, min) run time of each model in ms, runs interleaved so that load from elsewhere
    hits all of them; the min is the steadier figure on a busy machine."""
    sessions = []
    for model in models:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions.append(ort.InferenceSession(model.SerializeToString(), options,
                                             providers=["CPUExecutionProvider"]))
    for session in sessions:
        for _ in range(5):
            session.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < 20 or (time.perf_counter() - start < budget * len(sessions)
                                 and len(times[0]) < 2000):
        for session, bucket in zip(sessions, times):
            t0 = time.perf_counter()
            session.run(None, feeds)
            bucket.append(time.perf_counter() - t0)
    return [(statistics.median(b) * 1e3, min(b) * 1e3) for b in times]


def run_once(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


CASES: list[tuple[str, Callable[[], onnx.ModelProto], list[tuple[str, object, dict]]]] = []


def techniques(ranks: list[int], structured: bool = True) -> list[tuple[str, object, dict]]:
    out: list[tuple[str, object, dict]] = [
        (f"lowrank r={r}", LOWRANK, {"rank": r}) for r in ranks]
    for s in (0.5, 0.9):
        for storage in ("dense", "sparse"):
            out.append((f"prune {s:.0%} {storage}", PRUNE, {"sparsity": s, "storage": storage}))
    if structured:
        out.append(("prune 50% structured", PRUNE, {"sparsity": 0.5, "structured": True}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.6, help="seconds of runs per timing")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                        help="intra-op thread counts (0 = onnxruntime default)")
    args = parser.parse_args()
    cases = [
        ("gpt2 attn proj 768→768", linear(768, 768), techniques([64, 192, 384], False)),
        ("gpt2 mlp fc 768→3072", linear(768, 3072), techniques([64, 192, 384], False)),
        ("gpt2 mlp fc1+gelu+fc2", mlp(), techniques([192], True)),
        ("conv3×3 64→64 56²", conv(64, 64, 3), techniques([16, 32], False)),
        ("conv1×1 64→256 56²", conv(64, 256, 1), techniques([16, 32], False)),
        ("conv3×3+bn+relu+conv3×3 64", conv_block(), techniques([16], True)),
    ]
    header = (f"{'case':28} {'technique':22} {'thr':>3} {'before ms':>9} {'after ms':>9} "
              f"{'speedup':>7} {'by min':>7} {'rel err':>8} {'bytes before':>12} {'bytes after':>11}")
    print(header)
    print("-" * len(header))
    for case, model, plans in cases:
        inp = model.graph.input[0]
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        feeds = {inp.name: RNG.standard_normal(shape).astype(np.float32)}
        reference = run_once(model, feeds)
        for label, pass_, params in plans:
            result = pass_.apply(model, ["fc"], pass_.validate_params(params), PassContext())
            if not result.applied:
                print(f"{case:28} {label:22} skipped: {result.skipped.get('fc')}")
                continue
            onnx.checker.check_model(result.model, full_check=True)
            out = run_once(result.model, feeds)
            err = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
            for t in args.threads:
                (before, fast_before), (after, fast_after) = median_ms(
                    [model, result.model], feeds, t, args.budget)
                print(f"{case:28} {label:22} {t or 'def':>3} {before:9.3f} {after:9.3f} "
                      f"{before / after:6.2f}× {fast_before / fast_after:6.2f}× {err:8.4f} {model.ByteSize():12,} "
                      f"{result.model.ByteSize():11,}")


if __name__ == "__main__":
    main()
