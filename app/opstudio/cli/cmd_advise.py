"""``opstudio advise MODEL``: measure per-node sensitivity and propose a plan within a budget.

Exits 1 when no candidate could be applied at all (each was refused or failed: the reasons are
printed, grouped), and 0 when rewrites were measured but none pays within the budget.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from opstudio.cli.cmd_profile import add_profile_flags, print_roofline, settings_from_args
from opstudio.cli.common import clear_progress, print_table, progress_printer, write_json
from opstudio.core import reasons
from opstudio.core.advisor import Budget, advise
from opstudio.core.errors import OpstudioError
from opstudio.core.passes import TECHNIQUES
from opstudio.core.sensitivity import DEFAULT_TECHNIQUES


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
    p.add_argument("--techniques", default=",".join(DEFAULT_TECHNIQUES),
                   help=f"comma-separated techniques to try (default: %(default)s; "
                        f"known: {', '.join(TECHNIQUES)})")
    p.add_argument("--max-nodes", type=int, default=40, metavar="N",
                   help="scan at most the N slowest weighted operators (default 40)")
    p.add_argument("--no-cache", action="store_true", help="measure again even if cached")
    p.add_argument("-o", "--output", required=True, metavar="RECIPE.json",
                   help="where to write the recipe")
    p.add_argument("--overwrite", action="store_true", help="replace an existing recipe file")
    p.add_argument("--json", metavar="PATH|-", help="write sensitivity, roofline and plan as JSON")
    add_profile_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    budget = Budget(min_snr_db=args.budget_snr) if args.budget_snr is not None else \
        Budget(min_cosine=args.budget_cosine if args.budget_cosine is not None else 0.999)
    techniques = {}
    for name in (t.strip() for t in args.techniques.split(",") if t.strip()):
        if name not in TECHNIQUES:
            raise OpstudioError(f"--techniques: unknown technique {name!r}; "
                                f"expected some of {', '.join(TECHNIQUES)}")
        techniques[name] = DEFAULT_TECHNIQUES.get(name, {})
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise OpstudioError(f"{out}: already exists (pass --overwrite to replace it)")
    settings = settings_from_args(args)
    progress = progress_printer()
    advice = advise(args.model, settings, budget, techniques, max_nodes=args.max_nodes,
                    use_cache=not args.no_cache, progress=progress)
    clear_progress()
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
    refused = [f"{t}: {why}" for t, nodes in sens.refused.items() for why in nodes.values()]
    if refused:
        print(f"not tried ({len(refused)}, the technique cannot take the node): "
              + reasons.summarise(refused, limit=4))
    print()
    for line in plan.log:
        print(line)
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


def _db(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.1f}"




