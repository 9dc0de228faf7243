"""Per-node latency effect of every technique, measured the way opstudio measures it.

For a GPT-2-small-sized block (d=768, MLP 3072, seq 128) and a ResNet-like CNN (224×224), each
technique is applied to every node that can take it (by op type), and the optimized model is
compared with the original through ``compare_models``: both profiled on the same inputs, per
original node, medians over the timed runs. The table lists, per technique, each weighted node's
time before and after, and the whole-model result with the output accuracy.

    python benchmarks/bench_techniques.py [--runs 30] [--threads 0] [--only gpt2_block]
        [--seq 128]

``--seq 1`` gives the block's decode shape, where the weight MatMuls are memory-bound: INT4
weight-only, which does not beat the fp32 kernels at seq 128 here, then pays (per node 1.3–1.5×
on a 2-core machine, against 0.96–1.02× at seq 128).

Expect, on a CPU: INT8 helps the large GEMMs, FP16 and unstructured sparsity do not (no FP16
kernels, dense kernels ignore zeros), low-rank and structured pruning help in proportion to the
FLOPs they remove, at an accuracy cost that random weights exaggerate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # model_builders

from model_builders import gpt2_block, resnet_like
from opstudio.core.errors import OpstudioError
from opstudio.core.measure.compare import compare_models
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.plan.optimize import optimize
from opstudio.core.plan.recipe import Recipe, Step

WEIGHTED = ("MatMul", "Gemm", "Conv")
TECHNIQUES = [
    ("lowrank", {"energy": 0.5}),
    ("prune", {"sparsity": 0.5, "structured": False}),
    ("prune", {"sparsity": 0.9, "structured": False, "storage": "sparse"}),
    ("prune", {"sparsity": 0.5, "structured": True}),
    ("int8-dynamic", {"per_channel": False}),
    ("int8-static", {"calibration": "random", "samples": 4, "method": "minmax"}),
    ("int4-weight", {"block_size": 32, "symmetric": True}),
    ("fp16", {}),
]


def label(technique: str, params: dict) -> str:
    inner = ",".join(f"{k}={v}" for k, v in params.items()
                     if k not in ("calibration", "samples", "method"))
    return f"{technique}({inner})" if inner else technique


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", choices=["gpt2_block", "resnet_like"])
    p.add_argument("--seq", type=int, default=128, help="the GPT-2 block's sequence length")
    args = p.parse_args()
    settings = ProfileSettings(runs=args.runs, warmup=5, threads=args.threads)
    models = {"gpt2_block": gpt2_block(seq=args.seq), "resnet_like": resnet_like()}
    if args.only:
        models = {args.only: models[args.only]}
    print(f"{'model':<12} {'technique':<36} {'node':<18} {'before ms':>10} {'after ms':>9} "
          f"{'speedup':>8}  accuracy")
    for name, model in models.items():
        weighted = {n.name for n in model.graph.node if n.op_type in WEIGHTED}
        present = sorted({n.op_type for n in model.graph.node} & set(WEIGHTED))
        for technique, params in TECHNIQUES:
            step = Step(technique, params, op_types=present)
            tag = label(technique, params)
            try:
                result = optimize(model, Recipe([step]))
            except OpstudioError as exc:
                print(f"{name:<12} {tag:<36} {'(not applied)':<18} {exc}")
                continue
            applied = set(result.steps[0].applied)
            if not applied:
                print(f"{name:<12} {tag:<36} {'(no node took it)':<18}")
                continue
            c = compare_models(model, result.model, settings)
            acc = c.accuracy.outputs[0]
            snr = "inf" if acc.snr_db is None or acc.snr_db == float("inf") else f"{acc.snr_db:.1f}"
            for row in c.nodes:
                touched = row.name in applied or applied & set(row.group)
                if row.name not in weighted or not touched:
                    continue
                sp = "" if row.speedup is None else f"{row.speedup:.2f}x"
                print(f"{name:<12} {tag:<36} {row.name:<18} {row.before_ms:>10.3f} "
                      f"{row.after_ms or 0.0:>9.3f} {sp:>8}")
            plain = c.plain_speedup
            print(f"{name:<12} {tag:<36} {'= whole model':<18} "
                  f"{c.before.plain_ms['p50']:>10.3f} {c.after.plain_ms['p50']:>9.3f} "
                  f"{(plain or 0):>7.2f}x  cosine {acc.cosine:.5f}, SNR {snr} dB, "
                  f"{len(applied)}/{len(weighted)} nodes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
