"""Profiling overhead and run-to-run spread of ``opstudio.core.measure.profiler`` on generated models.

For models of roughly 1 ms, 10 ms, 100 ms and 1 s per run (MLP blocks of growing width, a conv
net), prints:

- overhead: median wall time of a profiled run over that of a plain run (same session options);
- spread: over ``--repeats`` independent profiles, the coefficient of variation (std/mean) of
  each operator's mean time, for operators above 5 % of the run: the median and the worst; also
  the worst CV of the operators' median time and of their share of the run (the share cancels a
  machine-wide slowdown, e.g. other processes competing for the cores).

Targets (issue 3): overhead under 1.3x for runs over 1 ms; spread under 5 %.

    python benchmarks/bench_profiler.py [--repeats 5] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.measure.profiler import ProfileSettings, profile_model
from opstudio.core.model.model_io import save_model
from opstudio.core.tempdir import opstudio_tempdir


def _w(rng, name, shape):
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32), name)


def mlp(width: int, rows: int, layers: int = 4):
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [_w(rng, f"W{i}", (width, width)), _w(rng, f"B{i}", (width,))]
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"], name=f"add{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}")]
        x = f"h{i}"
    nodes.append(helper.make_node("Softmax", [x], ["y"], name="softmax", axis=-1))
    g = helper.make_graph(nodes, "mlp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, width])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def convnet(channels: int, size: int, layers: int = 4):
    rng = np.random.default_rng(0)
    nodes, inits, x, c = [], [], "x", 3
    for i in range(layers):
        inits += [_w(rng, f"W{i}", (channels, c, 3, 3)), _w(rng, f"B{i}", (channels,))]
        nodes += [helper.make_node("Conv", [x, f"W{i}", f"B{i}"], [f"c{i}"], name=f"conv{i}",
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x, c = f"r{i}", channels
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"], name="pool"))
    g = helper.make_graph(nodes, "convnet",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         [1, 3, size, size])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                         [1, channels, 1, 1])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


CASES = [
    ("mlp 256x64 (~1 ms)", lambda: mlp(256, 64), 40),
    ("mlp 512x256 (~10 ms)", lambda: mlp(512, 256), 20),
    ("conv 32ch 64px (~10 ms)", lambda: convnet(32, 64), 20),
    ("mlp 1024x768 (~100 ms)", lambda: mlp(1024, 768), 10),
    ("conv 64ch 160px (~100+ ms)", lambda: convnet(64, 160), 8),
    ("mlp 2048x1536 (~1 s)", lambda: mlp(2048, 1536), 4),
]


def bench(name: str, model, runs: int, repeats: int, threads: int, tmp: Path) -> dict:
    path = tmp / "model.onnx"
    save_model(model, path, overwrite=True)
    settings = ProfileSettings(runs=runs, warmup=2, threads=threads)
    profiles = [profile_model(path, settings) for _ in range(repeats)]
    ratios = [p.overhead["ratio"] for p in profiles]
    plain = statistics.median(p.overhead["plain_wall_ms"] for p in profiles)
    prof = statistics.median(p.overhead["profiled_wall_ms"] for p in profiles)
    cvs, cvs_p50, cvs_share = [], [], []
    for node in profiles[0].nodes:
        if node.share < 0.05:
            continue
        rows = [p.node(node.name) for p in profiles]
        cvs.append(_cv([r.mean_ms if r else 0.0 for r in rows]))
        cvs_p50.append(_cv([r.p50_ms if r else 0.0 for r in rows]))
        cvs_share.append(_cv([r.share if r else 0.0 for r in rows]))
    traced = statistics.median(
        (sum(n.mean_ms for n in p.nodes) + p.unattributed_ms) / p.total_ms["mean"]
        for p in profiles)
    return {"name": name, "plain_ms": plain, "profiled_ms": prof,
            "ratio": statistics.median(ratios), "ops": len(cvs),
            "cv_median": statistics.median(cvs) if cvs else 0.0,
            "cv_max": max(cvs) if cvs else 0.0,
            "cv_p50_max": max(cvs_p50) if cvs_p50 else 0.0,
            "cv_share_max": max(cvs_share) if cvs_share else 0.0, "traced": traced}


def _cv(values: list[float]) -> float:
    m = statistics.fmean(values)
    return statistics.stdev(values) / m if m > 0 and len(values) > 1 else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: steadiest numbers on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="skip the ~1 s model")
    args = ap.parse_args()
    rows = []
    t0 = time.time()
    with opstudio_tempdir(prefix="bench-") as tmp:
        for name, build, runs in CASES:
            if args.quick and "1 s" in name:
                continue
            r = bench(name, build(), runs, args.repeats, args.threads, tmp)
            rows.append(r)
            print(f"  done {name} ({time.time() - t0:.0f} s)", file=sys.stderr)
    head = (f"{'model':28} {'plain ms':>10} {'profiled ms':>12} {'overhead':>9} "
            f"{'ops>5%':>6} {'CV med':>7} {'CV max':>7} {'p50 max':>7} {'share max':>9} "
            f"{'traced':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:28} {r['plain_ms']:10.3f} {r['profiled_ms']:12.3f} "
              f"{r['ratio']:8.2f}x {r['ops']:6d} {r['cv_median']:7.1%} {r['cv_max']:7.1%} "
              f"{r['cv_p50_max']:7.1%} {r['cv_share_max']:9.1%} {r['traced']:7.1%}")
    print(f"\n{args.repeats} profiles per model, threads={args.threads}; overhead = median "
          "profiled wall time / median plain wall time; CV over the repeats of each operator's "
          "mean (CV med/max), of its median (p50 max) and of its share of the run (share max); traced = share of model_run covered by kernel events.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
