"""``opstudio advise MODEL``: measure per-node sensitivity and propose a plan within a budget.

Exits 1 when no candidate could be applied at all (each was refused or failed: the reasons are
printed, grouped), and 0 when rewrites were measured but none pays within the budget.

With ``--budget-top1`` or ``--budget-kl`` a language model is planned for its decode step (or
prefill, ``--phase prefill``) by layer and role, judged by next-token agreement on the prompt in
``--inputs`` (``opstudio.core.plan.llm``); the frontier of agreement against speedup is printed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from opstudio.cli.cmd_profile import add_profile_flags, print_roofline, settings_from_args
from opstudio.cli.common import (
    add_text_flags,
    print_table,
    write_json,
)
from opstudio.cli.progress import progress_line
from opstudio.core.errors import OpstudioError
from opstudio.core.measure.text_prompt import find_tokenizer
from opstudio.core.passes import TECHNIQUES
from opstudio.core.plan import reasons
from opstudio.core.plan.advisor import advise
from opstudio.core.plan.budget import CONFIDENCE, Budget
from opstudio.core.plan.llm import LLM_TECHNIQUES, LlmAdvice, advise_llm, variants_for
from opstudio.core.plan.sensitivity import DEFAULT_TECHNIQUES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "advise", help="measure per-node sensitivity and write an automatic plan (recipe)",
        description="For the slowest weighted operators, try each technique alone and measure "
                    "its latency gain and output error; then choose a per-node plan greedily "
                    "by gain per error, verify it end to end and back off until the accuracy "
                    "budget holds. The result is an ordinary recipe.")
    p.add_argument("model", help="path to an .onnx file")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-cosine", type=float, metavar="X",
                        help="keep cosine similarity ≥ X on every output (default 0.999)")
    budget.add_argument("--budget-snr", type=float, metavar="DB",
                        help="keep SNR ≥ DB decibels on every output")
    budget.add_argument("--budget-top1", type=float, metavar="X",
                        help="language models: keep next-token top-1 agreement ≥ X on the "
                             "prompt's logits at every position (plans the decode step; "
                             "--phase prefill plans the prefill)")
    budget.add_argument("--budget-kl", type=float, metavar="NATS",
                        help="language models: keep the mean next-token KL divergence ≤ NATS")
    p.add_argument("--confidence", type=float, default=CONFIDENCE, metavar="C",
                   help=f"with a next-token budget: the plan must hold it by a one-sided "
                        f"bound at confidence C on the judged tokens, so that it carries over "
                        f"to other text (default {CONFIDENCE}; 0.5 judges on the measured "
                        f"value alone)")
    p.add_argument("--techniques", default=None,
                   help=f"comma-separated techniques to try (default: "
                        f"{','.join(DEFAULT_TECHNIQUES)}; with a next-token budget "
                        f"{','.join(LLM_TECHNIQUES)}; known: {', '.join(TECHNIQUES)})")
    p.add_argument("--int4-algorithms", default=None, metavar="LIST",
                   help="with a next-token budget: INT4 algorithms to try, of awq, rtn, hqq, "
                        "gptq (default: awq, in blocks of 32 and of 64; hqq and gptq need "
                        "torch)")
    p.add_argument("--max-nodes", type=int, default=40, metavar="N",
                   help="scan at most the N slowest weighted operators (default 40)")
    p.add_argument("--cluster", default=None, metavar="auto|ray://HOST:PORT",
                   help="with a next-token budget: judge the scan's variants on the workers "
                        "of a Ray cluster (auto: a Ray on this machine, started if none runs; "
                        "ray://HOST:PORT: a cluster's client address). The model must be on a "
                        "path every worker reads; timing stays on this machine, whose latency "
                        "the plan is for. Needs pip install 'opstudio[cluster]'")
    p.add_argument("--no-cache", action="store_true", help="measure again even if cached")
    p.add_argument("-o", "--output", required=True, metavar="RECIPE.json",
                   help="where to write the recipe")
    p.add_argument("--overwrite", action="store_true", help="replace an existing recipe file")
    p.add_argument("--json", metavar="PATH|-", help="write sensitivity, roofline and plan as JSON")
    add_profile_flags(p)
    add_text_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.budget_top1 is not None or args.budget_kl is not None:
        return run_llm(args)
    if args.int4_algorithms is not None:
        raise OpstudioError("--int4-algorithms applies with --budget-top1 or --budget-kl")
    if args.confidence != CONFIDENCE:
        raise OpstudioError("--confidence applies with --budget-top1 or --budget-kl")
    if args.cluster is not None:
        raise OpstudioError("--cluster applies with --budget-top1 or --budget-kl (the "
                            "per-operator scan times every rewrite on this machine)")
    for flag, value in (("--prompt-text", args.prompt_text), ("--tokenizer", args.tokenizer)):
        if value is not None:
            raise OpstudioError(f"{flag} applies with --budget-top1 or --budget-kl (the "
                                "per-operator scan judges by cosine or SNR on the inputs)")
    budget = Budget(min_snr_db=args.budget_snr) if args.budget_snr is not None else \
        Budget(min_cosine=args.budget_cosine if args.budget_cosine is not None else 0.999)
    techniques = {}
    names = args.techniques if args.techniques is not None else ",".join(DEFAULT_TECHNIQUES)
    for name in (t.strip() for t in names.split(",") if t.strip()):
        if name not in TECHNIQUES:
            raise OpstudioError(f"--techniques: unknown technique {name!r}; "
                                f"expected some of {', '.join(TECHNIQUES)}")
        techniques[name] = DEFAULT_TECHNIQUES.get(name, {})
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise OpstudioError(f"{out}: already exists (pass --overwrite to replace it)")
    settings = settings_from_args(args)
    with progress_line() as progress:
        advice = advise(args.model, settings, budget, techniques, max_nodes=args.max_nodes,
                        use_cache=not args.no_cache, progress=progress)
    sens, machine, points, plan = (advice.sensitivity, advice.machine, advice.roofline,
                                   advice.plan)

    print_roofline(machine, sorted(points.values(), key=lambda p: -p.ms), top=15)
    print()
    rows = []
    for c in sorted(sens.candidates, key=lambda c: (-c.before_ms, c.key)):
        pt = points.get(c.node)
        rows.append((c.node, c.op_type, pt.bound if pt else "", c.label,
                     f"{c.before_ms:.4f}", "" if c.after_ms is None else f"{c.after_ms:.4f}",
                     "" if c.cosine is None else f"{c.cosine:.6f}", _db(c.snr_db),
                     (c.error or "")[:60]))
    print_table(("operator", "op", "bound", "technique", "before ms", "after ms", "cosine",
                 "SNR dB", "note"), rows, "lllllrrrrl")
    _print_refused_and_log(sens.refused, plan.log)
    print(f"\nplan ({budget.describe()}): {len(plan.chosen)} rewrites, predicted gain "
          f"{plan.predicted_gain_ms:.4f} ms of {sens.baseline.total_ms['mean']:.4f} ms")
    for c in plan.chosen:
        print(f"  {c.node}: {c.label}, SNR {_db(c.snr_db)} dB — {advice.explain(c)}")
    if plan.verified is not None:
        print(f"verified end to end: cosine {plan.verified.cosine:.6f}, "
              f"SNR {_db(plan.verified.snr_db)} dB")
    nothing = advice.nothing_applies
    if plan.recipe.steps:
        plan.recipe.save(out, overwrite=args.overwrite)
        print(f"recipe written to {out}")
    elif nothing is None:
        print(f"no rewrite saves time within the budget: the model is best left as it is; "
              f"no recipe written to {out}")
    if args.json:
        write_json({"model": args.model, **advice.to_json()}, args.json)
    if nothing is not None:
        # not "nothing pays": nothing was even tried successfully, which the user must hear
        raise OpstudioError(f"nothing could be applied ({nothing}); no recipe written to {out}")
    return 0


def run_llm(args: argparse.Namespace) -> int:
    """A language model planned by layer and role within a next-token budget."""
    budget = (Budget(min_top1=args.budget_top1, confidence=args.confidence)
              if args.budget_top1 is not None
              else Budget(max_kl=args.budget_kl, confidence=args.confidence))
    settings = settings_from_args(args)
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise OpstudioError(f"{out}: already exists (pass --overwrite to replace it)")
    names = [t.strip() for t in (args.techniques or ",".join(LLM_TECHNIQUES)).split(",")
             if t.strip()]
    algorithms = None if args.int4_algorithms is None else [
        a.strip() for a in args.int4_algorithms.split(",") if a.strip()]
    for a in algorithms or ():
        if a not in ("awq", "rtn", "hqq", "gptq"):
            raise OpstudioError(f"--int4-algorithms: unknown algorithm {a!r}; "
                                "expected some of awq, rtn, hqq, gptq")
    if not args.inputs and args.tokenizer is None and find_tokenizer(args.model) is None:
        # the planner judges on the built-in text when it has the tokenizer (its log says)
        print("note: no --inputs prompt and no tokenizer: agreement is judged on synthetic "
              "tokens, not a measure of quality; give the model's tokenizer.json with "
              "--tokenizer (or a prompt, an .npz of the model's inputs, with --inputs)")
    variants = variants_for(names, "random", algorithms)
    with progress_line() as progress:
        advice = advise_llm(args.model, settings, budget, variants, use_cache=not args.no_cache,
                            progress=progress, cluster=args.cluster)
    print_llm_advice(advice)
    if advice.recipe.steps:
        advice.recipe.save(out, overwrite=args.overwrite)
        print(f"recipe written to {out}")
    elif advice.nothing_applies is None:
        print(f"no rewrite saves time within the budget: the model is best left as it is; "
              f"no recipe written to {out}")
    if args.json:
        write_json({"model": args.model, **advice.to_json()}, args.json)
    if advice.nothing_applies is not None:
        raise OpstudioError(f"nothing could be applied ({advice.nothing_applies}); "
                            f"no recipe written to {out}")
    return 0


def print_llm_advice(advice: LlmAdvice) -> None:
    names = {v.id: v.label for v in advice.variants}
    step = "decode step" if advice.phase == "decode" else "prefill"
    rows = [(names[r.variant], r.role, str(len(r.nodes)), _num(r.top1, 4), _num(r.kl, 4),
             (r.error or "")[:60]) for r in advice.roles]
    if rows:
        print("by role (every layer at once), on the prompt:")
        print_table(("technique", "role", "layers", "top-1", "KL nats", "note"), rows, "llrrrl")
    if advice.layer_kl:
        ref = names.get(advice.variants[0].id, "")
        print(f"\nlayer sensitivity ({ref} on every role of one layer; KL nats): "
              + ", ".join(f"{k}: {v:.3g}" for k, v in sorted(advice.layer_kl.items())))
    _print_refused_and_log(advice.refused, advice.log)
    if advice.frontier:
        print(f"\nfrontier (next-token agreement vs {step} speedup; base "
              f"{advice.base_ms:.2f} ms):")
        points = sorted(advice.frontier, key=lambda p: (-(p.top1 or 0), p.label))
        print_table(("plan", "top-1", "KL nats", "speedup", "interval", "budget"),
                    [(p.label, _num(p.top1, 4), _num(p.kl, 4),
                      "" if p.speedup is None else f"{p.speedup:.2f}×"
                      + ("" if p.low is not None or p.kind == "whole" else " (predicted)"),
                      "" if p.low is None else f"[{p.low:.2f}, {p.high:.2f}]",
                      "holds" if p.holds else "")
                     for p in points], "lrrrrl")
    print(f"\nplan ({advice.budget.describe()}): {len(advice.chosen)} rewrites")
    for s in advice.recipe.steps:
        print(f"  {s.technique} {s.params}: {len(s.nodes or [])} node(s)")
    if advice.verified is not None:
        print(f"verified on the prompt: top-1 {_num(advice.verified['top1'], 4)}, "
              f"KL {_num(advice.verified['kl'], 4)}")
    if advice.speedup is not None:
        print(f"{step}: {advice.speedup.speedup:.2f}× faster "
              f"[{advice.speedup.low:.2f}, {advice.speedup.high:.2f}]")
    print(f"advise took {advice.seconds:.0f} s")


def _num(x: float | None, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _db(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.1f}"


def _print_refused_and_log(refused: Mapping[str, Mapping[str, str]], log: Sequence[str]) -> None:
    """What no technique could take, grouped, then the planner's log."""
    reasons_ = [f"{t}: {why}" for t, nodes in refused.items() for why in nodes.values()]
    if reasons_:
        print(f"not tried ({len(reasons_)}, the technique cannot take the node): "
              + reasons.summarise(reasons_, limit=4))
    print()
    for line in log:
        print(line)
