"""Operator fusion (``fuse``) on a trained HF-layout decoder: unfused vs fused fp32 decode.

The model is SmolLM2-135M-Instruct as optimum exports it (real weights, fp16 storage behind
Casts, 30 layers), in ``~/.cache/opstudio-bench/llm/trained_hf/`` with ``prompt_b.npz`` beside
it. ``fuse`` is applied to every layer's norms, rotary embeddings and attention (the recipe below, as
``opstudio optimize`` applies it), then both models are profiled at one decode step after a
past of ``--past`` tokens, their rounds taking turns in one child process
(``core.compare.compare_models``, as ``opstudio compare A B --phase decode --past 512``): the
ratios are medians of per-round ratios with their 95 % bootstrap intervals. Printed: the step's
time, the kernels onnxruntime runs per step (after its own graph optimizations), the rows whose
change is significant, and next-token agreement on every position of ``prompt_b.npz``. With
``--int4``, whole-model INT4 (``int4-weight`` on every MatMul, defaults) of the unfused model
against the same INT4 of the fused one, timed the same way.

    python benchmarks/bench_fusion.py [--model PATH] [--past 512] [--runs 40] [--out DIR] [--int4]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from opstudio.core.accuracy import evaluate
from opstudio.core.compare import compare_models, interval_text
from opstudio.core.optimize import optimize_file
from opstudio.core.profiler import ProfileSettings
from opstudio.core.recipe import Recipe

FUSE_ALL = {"version": 1, "steps": [{"op_types": ["Pow", "Neg"], "technique": "fuse"}]}
INT4_ALL = {"version": 1, "steps": [{"op_types": ["MatMul"], "technique": "int4-weight"}]}
DEFAULT_MODEL = Path.home() / ".cache/opstudio-bench/llm/trained_hf/model.onnx"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--past", type=int, default=512)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("/tmp/opstudio-bench-fusion"))
    parser.add_argument("--int4", action="store_true",
                        help="also compare whole-model INT4 unfused against fused")
    args = parser.parse_args(argv)
    if not args.model.exists():
        print(f"{args.model}: not found (the trained HF-style export)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    fused = args.out / "fused.onnx"
    start = time.perf_counter()
    result = optimize_file(args.model, Recipe.from_json(FUSE_ALL), fused, overwrite=True)
    print(f"fuse: {time.perf_counter() - start:.1f} s; {'; '.join(result.steps[0].notes)}")

    settings = ProfileSettings(runs=args.runs, phase="decode", past=args.past)
    comparison = compare_models(args.model, fused, settings)
    kernels = {side: Counter(e["op"] for e in p.kernel_events)
               for side, p in (("unfused", comparison.before), ("fused", comparison.after))}
    print(f"\n{comparison.step}, {comparison.before.runs} rounds, interleaved; "
          f"{comparison.noise()}")
    print(f"{'model':10} {'plain p50 ms':>12} {'profiled p50 ms':>15} {'kernels/step':>12}")
    for side, p in (("unfused", comparison.before), ("fused", comparison.after)):
        print(f"{side:10} {(p.plain_ms or {}).get('p50', float('nan')):12.2f} "
              f"{p.total_ms['p50']:15.2f} {sum(kernels[side].values()):12d}")
    for label, ratio in (("plain", comparison.plain_ratio), ("profiled", comparison.total_ratio)):
        median = "n/a" if ratio is None else f"{ratio.median:.2f}×"
        print(f"speed-up ({label} runs): {median}, {interval_text(ratio)}")
    print("\nkernels per step by op type (unfused → fused), where they differ:")
    for op in sorted(set(kernels["unfused"]) | set(kernels["fused"]),
                     key=lambda o: -kernels["unfused"][o]):
        if kernels["unfused"][op] != kernels["fused"][op]:
            print(f"  {op:36} {kernels['unfused'][op]:5d} → {kernels['fused'][op]:5d}")
    rows = [r for r in comparison.op_types() if r["ratio"] is not None and r["ratio"].significant]
    print("\nop types whose time changed significantly (ms per step, unfused → fused):")
    for r in rows[:12]:
        print(f"  {r['op_type']:36} {r['before_ms']:7.3f} → {r['after_ms']:7.3f}")

    prompt = args.model.parent / "prompt_b.npz"
    if prompt.exists():
        with np.load(prompt) as data:
            feeds = {k: data[k] for k in data.files}
        report = evaluate(str(args.model), str(fused), feeds, threads=0)
        print(f"\non {prompt.name} ({feeds['input_ids'].shape[1]} tokens): {report.summary()}")
    if args.int4:
        int4 = [args.out / "int4.onnx", args.out / "fused_int4.onnx"]
        for source, target in zip((args.model, fused), int4, strict=True):
            optimize_file(source, Recipe.from_json(INT4_ALL), target, overwrite=True)
        pair = compare_models(int4[0], int4[1], settings)
        print(f"\nINT4 (every MatMul) unfused → fused: plain p50 "
              f"{(pair.before.plain_ms or {}).get('p50', float('nan')):.2f} → "
              f"{(pair.after.plain_ms or {}).get('p50', float('nan')):.2f} ms, "
              f"{'n/a' if pair.plain_ratio is None else f'{pair.plain_ratio.median:.2f}×'}, "
              f"{interval_text(pair.plain_ratio)}; {len(pair.before.kernel_events)} → "
              f"{len(pair.after.kernel_events)} kernels; {pair.noise()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
