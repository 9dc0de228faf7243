"""Run ``opstudio export-olive``'s workflow in Microsoft Olive and compare with opstudio's result.

    OPSTUDIO_BENCH_PYTHON=~/.cache/opstudio-bench/venv/bin/python \\
        python benchmarks/check_olive_workflow.py [--out /tmp/opstudio-olive]

olive-ai (0.13) pulls in torch, so it lives in the benchmark venv, not in the project's
environment: Olive runs as ``$OPSTUDIO_BENCH_PYTHON -m olive run --config workflow.json`` (the
current interpreter without the variable). The model is a small onnxruntime-genai-shaped
decoder built here (tests/llm_builders.py). The plan: low-rank on the q projections (no Olive
pass: listed, not exported), INT4 round-to-nearest on the k and v projections, INT8 dynamic on
the output projections. Olive runs the exported workflow, opstudio the plan without its
low-rank step (what Olive reproduces); printed per
quantized node: the largest difference between opstudio's and Olive's dequantized INT4 weights
(in units of the block's scale), then the logits of the two results on one prompt against each
other and against the original. Exit status 1 when a quantized weight differs by more than one
rounding step or Olive fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from opstudio.cli import main as cli_main
from opstudio.core.model import provenance

PLAN = {"version": 1, "steps": [
    {"name_pattern": "*/attn/q_proj/MatMul", "technique": "lowrank", "params": {"rank": 8}},
    {"name_pattern": "*/attn/[kv]_proj/MatMul", "technique": "int4-weight",
     "params": {"block_size": 32, "symmetric": True, "accuracy_level": 4}},
    {"name_pattern": "*/attn/o_proj/MatMul", "technique": "int8-dynamic"},
]}


def dequantize(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    """A MatMulNBits node's weight [K, N] as float, and its scales [N, blocks]."""
    inits = {t.name: t for t in model.graph.initializer}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    packed = numpy_helper.to_array(inits[node.input[1]]).reshape(n, -1)
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64).reshape(n, -1)
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1).astype(np.float64)
    else:
        q = packed.astype(np.float64)
    zero = float(1 << (bits - 1))
    if len(node.input) > 3 and node.input[3]:
        raise SystemExit(f"{node.name}: asymmetric weights are not compared by this check")
    blocks = scales.shape[1]
    w = ((q[:, :blocks * block].reshape(n, blocks, block) - zero) * scales[:, :, None])
    return w.reshape(n, -1)[:, :k].T, scales


def logits(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/opstudio-olive"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from llm_builders import kv_decoder

    args.model = args.out / "decoder.onnx"
    onnx.save(kv_decoder("gqa", layers=2, hidden=128, heads=4, kv_heads=2, vocab=256),
              args.model)
    recipe = args.out / "plan.json"
    recipe.write_text(json.dumps(PLAN))
    # what Olive reproduces, applied by opstudio alone: the results must then agree
    exportable = args.out / "plan_exportable.json"
    exportable.write_text(json.dumps({**PLAN, "steps": PLAN["steps"][1:]}))
    ours = args.out / "opstudio.onnx"
    workflow = args.out / "workflow.json"
    olive_dir = args.out / "olive_output"
    for argv in (["optimize", str(args.model), "--recipe", str(exportable), "-o", str(ours),
                  "--overwrite", "--report", str(args.out / "report.json")],
                 ["export-olive", str(recipe), "--model", str(args.model), "-o", str(workflow),
                  "--output-dir", str(olive_dir), "--overwrite"]):
        print("$ opstudio " + " ".join(argv))
        if cli_main(argv) != 0:
            return 1
    python = os.environ.get("OPSTUDIO_BENCH_PYTHON") or sys.executable
    print(f"$ {python} -m olive run --config {workflow}")
    done = subprocess.run([python, "-m", "olive", "run", "--config", str(workflow)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:])
        return 1
    theirs = olive_dir / "model.onnx"

    a = onnx.load(ours)
    b = onnx.load(theirs)
    olive_nodes = {n.name.removesuffix("_Q4"): n for n in b.graph.node
                   if n.op_type == "MatMulNBits"}
    worst = 0.0
    print(f"\n{'node':<42} {'max |Δw| / scale':>17}")
    for node in a.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        origin = next(iter(provenance.get_origin(node)), node.name)
        other = olive_nodes.get(origin)
        if other is None:
            print(f"{origin:<42} {'(float in Olive)':>17}")
            continue
        wa, sa = dequantize(a, node)
        wb, _ = dequantize(b, other)
        block = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}["block_size"]
        step = np.repeat(sa, block, axis=1)[:, :wa.shape[0]].T
        diff = float(np.max(np.abs(wa - wb) / np.maximum(step, 1e-30)))
        worst = max(worst, diff)
        print(f"{origin:<42} {diff:>17.3g}")
    counts = {}
    for model, label in ((a, "opstudio"), (b, "Olive")):
        counts[label] = {op: sum(n.op_type == op for n in model.graph.node)
                         for op in ("MatMulNBits", "MatMulInteger", "MatMul")}
    print(f"\nop counts: {counts}")

    from opstudio.core.measure.inputs import make_inputs
    from opstudio.core.model.model_io import load_model

    feed = make_inputs(load_model(args.model, load_external_data=False), dims={"batch_size": 1,
                       "sequence_length": 16}, phase="prefill", model_path=args.model)
    ref, la, lb = (logits(p, feed) for p in (args.model, ours, theirs))

    def rel(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.max(np.abs(x - y)) / np.std(y))

    print(f"logits, max |Δ| / std: opstudio vs Olive {rel(la, lb):.3g}, opstudio vs original "
          f"{rel(la, ref):.3g}, Olive vs original {rel(lb, ref):.3g}")
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
