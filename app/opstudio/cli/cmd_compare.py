"""``opstudio compare BEFORE AFTER``: profile both on identical inputs, compare per operator."""

from __future__ import annotations

import argparse
import sys

from opstudio.cli.cmd_profile import add_profile_flags, settings_from_args
from opstudio.cli.common import (
    add_text_flags,
    print_table,
    synthetic_past_note,
    text_note,
    write_json,
)
from opstudio.cli.progress import progress_line
from opstudio.cli.request_view import (
    add_request_flags,
    apply_request_args,
    print_request_comparison,
)
from opstudio.core.measure.compare import (
    Comparison,
    NodeDelta,
    compare_models,
    operators_changed,
    speedup_label,
)
from opstudio.core.measure.timing import Ratio
from opstudio.core.measure.workload import Workload
from opstudio.core.plan import report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="profile two models on the same inputs and compare them per operator",
        description="Profile BEFORE and AFTER on identical inputs; report per-operator latency "
                    "(keyed by BEFORE's node names), accuracy of AFTER's outputs and file size.")
    p.add_argument("before", help="the reference model (.onnx)")
    p.add_argument("after", help="the optimized model (.onnx)")
    add_profile_flags(p)
    p.add_argument("--top", type=int, default=15, metavar="N",
                   help="operators to list (default 15)")
    p.add_argument("--json", metavar="PATH|-", help="write the comparison as JSON ('-' = stdout)")
    p.add_argument("--csv", metavar="PATH", help="write the per-operator table as CSV")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    add_text_flags(p)
    add_request_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    # the inputs of both, made from the first (the request's flags are read into its spec)
    workload = Workload.of(args.before, settings)
    requested = apply_request_args(args, settings, workload, [args.after])
    quiet = args.json == "-"
    hint = None if requested or settings.phase is not None else kv_cache_hint(workload)
    if hint:
        print(hint, file=sys.stderr if quiet else sys.stdout)
    with progress_line(not quiet) as progress:
        result = compare_models(args.before, args.after, settings, workload, progress=progress)
    if not quiet:
        print_summary(result, args.top)
        note = synthetic_past_note(settings.phase, args.inputs,
                                   judged_on_text=_on_text(result))
        if note:
            print(note)
        if result.request is not None:
            print()
            print_request_comparison(result.request)
    if args.json:
        write_json(report.comparison_json(result), args.json)
    if args.csv:
        report.write_csv(result, args.csv)
    if args.html:
        report.write_html(result, args.html)
    return 0


def kv_cache_hint(workload: Workload) -> str | None:
    """For a decoder with a KV cache compared as documented (the prefill): what its users
    feel is the decode step and the request, which a newcomer would not know to ask for (INT4
    on a trained decoder measured slower in prefill and 2.6× faster in decode)."""
    if not workload.has_kv_cache:
        return None
    return ("hint: this decoder has a KV cache and is timed here in prefill; add --phase decode "
            "for the step that makes each token, or --request for time to first token and "
            "tokens/s")


def print_summary(c: Comparison, top: int = 15) -> None:
    rows = []
    for r in c.nodes[:top]:
        # the verdict, not the median: "≈ 1×" within the noise, "too few runs" below 6 pairs
        rows.append((r.name, r.op_type, "-" if r.before_ms is None else f"{r.before_ms:.4f}",
                     "-" if r.after_ms is None else f"{r.after_ms:.4f}", r.label(),
                     "" if r.ratio is None else f"[{r.ratio.low:.2f}, {r.ratio.high:.2f}]",
                     _group(r), _change(r)))
    print_table(("operator", "op type", "before ms", "after ms", "speedup", "95% interval",
                 "group", "change"), rows, "llrrrrll")
    if c.changes_text():
        print(f"AFTER's nodes: {c.changes_text()}")
    tb, ta = c.before.total_ms, c.after.total_ms
    if c.step:  # a decoder's totals are one step's
        print(f"\nstep: {c.step}", end="")
    sp = speedup_label(c.speedup, c.total_ratio) or "n/a"
    print(f"\ntotal (median, profiled): {tb['p50']:.3f} ms -> {ta['p50']:.3f} ms  ({sp}"
          f"{_interval(c.total_ratio)})")
    plain_b, plain_a = c.before.plain_ms, c.after.plain_ms
    if c.plain_speedup is not None and plain_b is not None and plain_a is not None:
        print(f"total (median, plain):    {plain_b['p50']:.3f} ms -> "
              f"{plain_a['p50']:.3f} ms  ({speedup_label(c.plain_speedup, c.plain_ratio)}"
              f"{_interval(c.plain_ratio)})")
    if c.verdict_text():
        print(f"verdict: {c.verdict_text()}")
    if c.noise():
        print(f"noise: {c.noise()}")
    timed = [r for r in c.nodes if r.ratio is not None]
    if timed:
        print(operators_changed(timed))
    sb, sa = c.size_bytes["before"], c.size_bytes["after"]
    print(f"size: {sb:,} -> {sa:,} bytes ({(sa / sb if sb else 0):.0%})")
    for side, p in (("before", c.before), ("after", c.after)):
        if p.memory is not None:
            print(f"{side} {p.memory.line()}")
        for note in p.notes:
            if note.startswith("KV cache:"):  # the two sides may be fed differently
                print(f"{side} {note}")
    print()
    acc = [(o.name, _f(o.max_abs_err), _f(o.mean_abs_err), _f(o.cosine, 6), _f(o.snr_db, 1),
            "" if o.top1_agreement is None else f"{o.top1_agreement:.1%}",
            "" if o.kl_divergence is None else _f(o.kl_divergence))
           for o in c.accuracy.outputs]
    print_table(("output", "max abs err", "mean abs err", "cosine", "SNR dB", "top-1", "KL nats"),
                acc, "lrrrrrr")
    if c.accuracy.summary():
        print(c.accuracy.summary() + text_note(c.accuracy))


def _on_text(c: Comparison) -> bool:
    """The accuracy was judged on a text prompt, not on the timing inputs."""
    return bool(c.accuracy.judged_on) and not c.accuracy.synthetic \
        and not c.before.settings.inputs_path


def _interval(ratio: Ratio | None) -> str:
    return "" if ratio is None else f" [{ratio.low:.2f}, {ratio.high:.2f}]"


def _group(row: NodeDelta) -> str:
    """"+N" other nodes; a row named after its fused kernel counts every node it stands for."""
    if not row.group:
        return ""
    return f"{len(row.group)} nodes" if row.name not in row.group else f"+{len(row.group) - 1}"


def _change(row: NodeDelta) -> str:
    if row.status == "mapped":
        # the last path element is enough: "/model/layers.0/mlp/up_proj/MatMul_Q4" → "MatMul_Q4"
        return "as " + ", ".join(n.rsplit("/", 1)[-1] for n in row.after_names)
    return "" if row.status == "same" else row.status


def _f(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if x == float("inf"):
        return "inf"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"


