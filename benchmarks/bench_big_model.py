"""Time and peak memory of ``opstudio optimize`` on a big external-data LLM export.

An onnxruntime-genai export of a Qwen2.5-0.5B-shaped decoder (24 layers by default: ~1.9 GB of
fp32 weights in ``model.onnx.data``) is optimized with each recipe below in a fresh child
process, so every peak resident set size is that run's alone. The figure to watch is the peak
against the weights' size: the optimizer hands the loaded model to the passes, which rewrite it
in place, so what remains above the weights is the rewrite's own working set (onnxruntime's
quantizer works on the largest tensor, the 545 MB lm_head, in float temporaries) and the
result's load check.

    python benchmarks/bench_big_model.py [--layers 24] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_exports import DEFAULT_CACHE, genai_export

RECIPES = {
    "int4-weight, every MatMul + embedding": [
        {"op_types": ["MatMul", "Gather"], "technique": "int4-weight", "params": {}}],
    "int8-weight, every MatMul": [
        {"op_types": ["MatMul"], "technique": "int8-weight", "params": {}}],
    "int4-weight, MLP projections only": [
        {"name_pattern": "*/mlp/*_proj/MatMul", "technique": "int4-weight", "params": {}}],
}

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from opstudio.core.optimize import optimize_file
    from opstudio.core.recipe import Recipe
    started = time.perf_counter()
    result = optimize_file(sys.argv[1], Recipe.from_json(json.loads(sys.argv[2])), sys.argv[3])
    print(json.dumps({
        "seconds": time.perf_counter() - started,
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rewritten": sum(len(s.applied) for s in result.steps)}))
""")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    args = parser.parse_args(argv)
    source = genai_export(args.layers, "fp32", cache=args.cache)
    weights = sum(f.stat().st_size for f in source.parent.glob("model.onnx*"))
    print(f"{source} ({args.layers} layers): {weights / 2**30:.2f} GiB on disk")
    print(f"{'recipe':40} {'nodes':>6} {'seconds':>8} {'peak RSS GiB':>13} {'peak / size':>12} "
          f"{'output GiB':>11}")
    for name, steps in RECIPES.items():
        with tempfile.TemporaryDirectory(prefix="bench-big-") as folder:
            out = Path(folder) / "model.onnx"
            recipe = json.dumps({"version": 1, "steps": steps})
            run = subprocess.run([sys.executable, "-c", CHILD, str(source), recipe, str(out)],
                                 capture_output=True, text=True, check=False)
            if run.returncode != 0:
                print(f"{name:40} failed: {run.stderr.strip().splitlines()[-1]}")
                continue
            figures = json.loads(run.stdout.strip().splitlines()[-1])
            size = sum(f.stat().st_size for f in out.parent.glob("model.onnx*"))
            print(f"{name:40} {figures['rewritten']:6d} {figures['seconds']:8.1f} "
                  f"{figures['peak_bytes'] / 2**30:13.2f} {figures['peak_bytes'] / weights:11.2f}× "
                  f"{size / 2**30:11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
