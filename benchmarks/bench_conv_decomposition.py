"""Conv decomposition: SVD form (k×k to r, then 1×1) against Tucker-2 (1×1, k×k core, 1×1).

Every group-1 Conv with a spatial kernel (3×3, 7×7 …) of each model is factorized at the same
energy by both methods; the table gives, per model, method and energy: the convs taken, the
kernels' mean relative reconstruction error, the model's FLOPs and parameters after (as a share
of before), the output accuracy against fp32, and the latency, all variants of one model timed
in alternation (plain runs, no profiler) with the median ratio to fp32 and its 95 % interval.

    python benchmarks/bench_conv_decomposition.py [--real PATH.onnx ...] [--shape IN=d0,d1,…]
        [--energy 0.95 0.8] [--rounds 30] [--threads 0]

Accuracy is on the model's outputs, or on the logits where an output is a final Softmax.
Random weights (the generated ResNet-like CNN) have flat spectra, so both methods lose much
at any energy; trained weights (``--real``) are what the comparison is for.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # model_builders

from bench_advisor import parse_shape
from model_builders import resnet_like
from opstudio.core.measure.accuracy import compare_outputs, run_outputs
from opstudio.core.measure.inputs import make_inputs
from opstudio.core.measure.roofline import dims_from_inputs
from opstudio.core.measure.timing import interleaved_times, paired_ratio, session
from opstudio.core.model.graph import analyze
from opstudio.core.model.model_io import load_model
from opstudio.core.passes import PassContext, _weights
from opstudio.core.passes.lowrank import PASS as LOWRANK

METHODS = ("svd", "tucker2")


def spatial_convs(model) -> list[str]:
    """Group-1 Convs with a constant kernel wider than 1×1: where the two methods differ."""
    out = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight, _ = _weights.constant_array(model, node.input[1])
        if group == 1 and weight is not None and math.prod(weight.shape[2:]) > 1:
            out.append(node.name)
    return out


def expose_logits(model) -> str | None:
    """A classifier's final Softmax saturates on synthetic inputs (both a good and a poor
    approximation give [0.998, 0.002]), so accuracy is read on its input: the logits, made an
    extra graph output. Returns their name, or None when no output comes from a Softmax."""
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "Softmax" and node.output[0] in outputs:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
            return node.input[0]
    return None


def worst(report, only: str | None) -> tuple[float, float]:
    outputs = [o for o in report.outputs if only is None or o.name == only]
    cos = min(o.cosine for o in outputs if o.cosine is not None)
    snrs = [o.snr_db for o in outputs if o.snr_db is not None]
    return cos, min(snrs) if snrs else math.inf


def bench(name: str, model, args: argparse.Namespace) -> list[tuple]:
    names = {i.name for i in model.graph.input}
    inputs = make_inputs(model, shapes={k: v for k, v in args.shape.items() if k in names})
    dims = dims_from_inputs(model, inputs)  # so that FLOPs are concrete
    info = analyze(model, dims)
    flops0 = info.total_flops() or 0
    params0 = info.total_param_bytes()
    convs = spatial_convs(model)
    logits = expose_logits(model)
    reference = run_outputs(model, inputs)
    variants = {"fp32": model}
    rows: dict[str, tuple] = {}
    for energy in args.energy:
        for method in METHODS:
            # The pass itself, not the optimizer: a conv whose energy would not save
            # parameters is skipped (and counted) rather than failing the variant.
            report = LOWRANK.apply(model, convs, LOWRANK.validate_params(
                {"energy": energy, "method": method}), PassContext())
            errors = [d["rel_error"] for d in report.details.values()]
            after = analyze(report.model, dims)
            cos, snr = worst(compare_outputs(reference, run_outputs(report.model, inputs)),
                             logits)
            key = f"{method} e={energy:g}"
            variants[key] = report.model
            rows[key] = (len(report.applied), len(convs),
                         float(np.mean(errors)) if errors else 0.0,
                         (after.total_flops() or 0) / flops0 if flops0 else math.nan,
                         after.total_param_bytes() / params0, cos, snr)
    sessions = {k: session(m, args.threads) for k, m in variants.items()}
    times = interleaved_times(sessions, inputs, rounds=args.rounds)
    base = float(np.median(times["fp32"]))
    out = [(name, "fp32", f"-/{len(convs)}", "", "1.00", "1.00", f"{base:.2f}", "1.00×", "", "")]
    for key, (taken, total, err, flops, params, cos, snr) in rows.items():
        r = paired_ratio(times["fp32"], times[key])
        out.append((name, key, f"{taken}/{total}", f"{err:.3f}", f"{flops:.2f}", f"{params:.2f}",
                    f"{np.median(times[key]):.2f}",
                    f"{r.median:.2f}× [{r.low:.2f}, {r.high:.2f}]", f"{cos:.4f}",
                    "inf" if math.isinf(snr) else f"{snr:.1f}"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", nargs="*", default=[], help="CNNs with trained weights")
    p.add_argument("--shape", type=parse_shape, action="append", default=[],
                   help="INPUT=d0,d1,… for --real models with unknown dims")
    p.add_argument("--energy", type=float, nargs="+", default=[0.95, 0.8])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-generated", action="store_true", help="only the --real models")
    args = p.parse_args()
    args.shape = dict(args.shape)
    models = [] if args.no_generated else [("resnet_like", resnet_like())]
    models += [(Path(path).stem, load_model(path)) for path in args.real]
    header = ("model", "variant", "convs", "rel err", "FLOPs", "params", "median ms",
              "speedup [95 % CI]", "cosine", "SNR dB")
    widths = (14, 16, 8, 8, 6, 7, 10, 22, 8, 7)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)), flush=True)
    for name, model in models:
        for row in bench(name, model, args):
            row = (name[:14], *row[1:])
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
