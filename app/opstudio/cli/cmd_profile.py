"""``opstudio profile MODEL``: per-operator latency on onnxruntime, slowest operators first."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from opstudio.cli.common import (
    add_input_flags,
    parse_dims,
    parse_phase,
    parse_shapes,
    print_table,
    write_json,
)
from opstudio.cli.progress import progress_line
from opstudio.cli.request_view import add_request_flags, apply_request_args, print_request
from opstudio.core.fileio import write_text_atomic
from opstudio.core.measure.profiler import (
    OPT_LEVELS,
    Profile,
    ProfileSettings,
    profile_model,
    unsettled_note,
)
from opstudio.core.measure.settings import KV_BUFFERS
from opstudio.core.measure.workload import Workload


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile", help="measure per-operator latency on onnxruntime",
        description="Run MODEL on onnxruntime with profiling on, report time per original node "
                    "(fused kernels are reported once, against all the nodes they cover), the "
                    "whole run, and the plain (unprofiled) run time.")
    p.add_argument("model", help="path to an .onnx file")
    add_profile_flags(p)
    p.add_argument("--top", type=int, default=20, metavar="N",
                   help="operators to list (default 20, 0 = all)")
    p.add_argument("--json", metavar="PATH|-", help="write the profile as JSON ('-' = stdout)")
    p.add_argument("--csv", metavar="PATH", help="write the per-operator table as CSV")
    p.add_argument("--trace", metavar="PATH",
                   help="write one run as a Chrome/Perfetto trace (open in ui.perfetto.dev)")
    p.add_argument("--roofline", action="store_true",
                   help="also place the operators on this machine's roofline (arithmetic "
                        "intensity, achieved vs attainable GFLOP/s, compute- or memory-bound; "
                        "the machine's ceilings are measured once and cached)")
    p.add_argument("--by-layer", action="store_true",
                   help="also total the time per layer and module (attention, MLP, norms…), "
                        "read from node names like /model/layers.3/mlp/…")
    add_request_flags(p)
    p.set_defaults(func=run)


def add_profile_flags(parser: argparse.ArgumentParser) -> None:
    """Measurement flags and model-input flags; shared with ``compare``."""
    d = ProfileSettings()
    group = parser.add_argument_group("measurement")
    group.add_argument("--runs", type=int, default=d.runs, metavar="N",
                       help=f"timed runs (default {d.runs})")
    group.add_argument("--warmup", type=int, default=d.warmup, metavar="N",
                       help=f"untimed warm-up runs first (default {d.warmup})")
    group.add_argument("--threads", type=int, default=d.threads, metavar="N",
                       help="onnxruntime intra-op threads (default 0 = onnxruntime's choice)")
    group.add_argument("--opt-level", choices=OPT_LEVELS, default=d.opt_level,
                       help="onnxruntime graph optimization level (default: all, as deployed)")
    group.add_argument("--provider", default=d.provider, metavar="P",
                       help=f"onnxruntime execution provider (default {d.provider})")
    group.add_argument("--time-budget", type=float, default=None, metavar="S",
                       help="stop timed runs after S seconds (at least one run)")
    group.add_argument("--until-stable", type=float, nargs="?", const=5.0, default=None,
                       metavar="PCT",
                       help="after --runs, keep running until the 95%% interval of the total's "
                            "median is within PCT%% of it and stretches of the runs agree as "
                            "closely, on the total and the heaviest operators (default 5); "
                            "if that is not reached within the time budget (--time-budget, "
                            "else 30 s), say so and print no figures (exit 1)")
    group.add_argument("--timeout", type=float, default=d.timeout_s, metavar="S",
                       help=f"stop onnxruntime if it takes longer than S seconds in all "
                            f"(default {d.timeout_s:g})")
    group.add_argument("--kv-buffer", choices=KV_BUFFERS, default=d.kv_buffer,
                       help="a GroupQueryAttention decoder's past and present KV cache: one "
                            "buffer written in place, as onnxruntime-genai runs it (shared), "
                            "separate arrays (copy), or as the genai_config.json beside the "
                            "model says (auto, the default)")
    group.add_argument("--seed", type=int, default=d.seed, metavar="N",
                       help="seed of the generated inputs (default 0)")
    add_input_flags(parser)


def settings_from_args(args: argparse.Namespace) -> ProfileSettings:
    settings = ProfileSettings(
        runs=args.runs, warmup=args.warmup, threads=args.threads, opt_level=args.opt_level,
        provider=args.provider, time_budget_s=args.time_budget, timeout_s=args.timeout,
        dims=parse_dims(getattr(args, "dim", []) or []),
        shapes=parse_shapes(getattr(args, "shape", []) or []),
        inputs_path=getattr(args, "inputs", None), seed=getattr(args, "seed", 0),
        until_stable=getattr(args, "until_stable", None),
        kv_buffer=getattr(args, "kv_buffer", "auto"),
        prompt_text=getattr(args, "prompt_text", None), tokenizer=getattr(args, "tokenizer", None))
    settings.phase, settings.past = parse_phase(args)
    settings.validate()
    return settings


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    quiet = args.json == "-"
    workload = Workload.of(args.model, settings)
    wants_request = apply_request_args(args, settings, workload)
    with progress_line(not quiet) as progress:
        profile = profile_model(args.model, settings, workload, progress=progress)
    stable = profile.noise.get("stable")
    if stable and not stable["reached"]:
        # figures that move by more than was asked are not printed as if they held
        print(f"error: {unsettled_note(stable)}", file=sys.stderr)
        return 1
    request = None
    if wants_request:
        from opstudio.core.measure.request import estimate_requests

        with progress_line(not quiet) as progress:
            [request] = estimate_requests([args.model], settings, workload, progress=progress)
    roofline = None
    if args.roofline:
        from opstudio.core.measure.roofline import (
            dims_from_inputs,
            measure_machine,
            profile_roofline,
        )
        from opstudio.core.model.graph import analyze
        from opstudio.core.model.provenance import derived_nodes

        model, inputs = workload.model, workload.main()
        machine = measure_machine(settings.threads)
        points = profile_roofline(analyze(model, dims_from_inputs(model, inputs)), profile,
                                  machine, derived_nodes(model))
        roofline = (machine, points)
    if not quiet:
        print_summary(profile, args.top)
        if getattr(args, "by_layer", False):
            print()
            _print_by_layer(args.model, profile)
        if roofline is not None:
            print()
            print_roofline(*roofline, top=args.top)
        if request is not None:
            print()
            print_request(request)
    if args.json:
        data = profile.to_json()
        if roofline is not None:
            from dataclasses import asdict

            data["roofline"] = {"machine": asdict(roofline[0]),
                                "points": [p.to_json() for p in roofline[1]]}
        if request is not None:
            data["request"] = request.to_json()
        write_json(data, args.json)
    if args.csv:
        write_text_atomic(args.csv, profile.to_csv(), overwrite=True)
    if args.trace:
        write_text_atomic(args.trace, json.dumps(profile.to_chrome_trace()) + "\n",
                          overwrite=True)
    return 0


def _print_by_layer(model_path: str, profile: Profile) -> None:
    from opstudio.cli.by_layer import print_by_layer
    from opstudio.core.model.model_io import load_model

    names = [n.name for n in load_model(model_path, load_external_data=False).graph.node]
    known = set(names)
    names += [s.name for s in profile.nodes if s.name not in known]
    print_by_layer(names, [("median ms", {s.name: s.p50_ms for s in profile.nodes},
                            lambda v: f"{v:.4f}"),
                           ("share", {s.name: s.share for s in profile.nodes},
                            lambda v: f"{v:.1%}")])


def print_summary(p: Profile, top: int = 20, file=None) -> None:
    file = file or sys.stdout
    nodes = p.nodes if top <= 0 else p.nodes[:top]
    # sorted by median: one run another process interrupted does not move a median
    rows = [(n.name, n.op_type, f"{n.p50_ms:.4f}", f"{n.p90_ms:.4f}", f"{n.mean_ms:.4f}",
             f"{n.share:.1%}", f"{n.calls:g}", f"+{len(n.group) - 1}" if n.group else "")
            for n in nodes]
    print_table(("operator", "op type", "median ms", "p90 ms", "mean ms", "share", "calls",
                 "fused"), rows, "llrrrrrl", file=file)
    if len(p.nodes) > len(nodes):
        rest = sum(n.p50_ms for n in p.nodes[len(nodes):])
        print(f"... {len(p.nodes) - len(nodes)} more operators, {rest:.4f} ms", file=file)
    t = p.total_ms
    noise = p.noise or {}
    print(file=file)
    print(f"total (profiled, model_run): median {t['p50']:.4f} ms{_ci(noise.get('total_ci'))}  "
          f"mean {t['mean']:.4f}  p90 {t['p90']:.4f}  min {t['min']:.4f}  std {t['std']:.4f}  "
          f"({p.runs} runs)", file=file)
    if p.plain_ms:
        q = p.plain_ms
        print(f"total (plain, no profiler):  median {q['p50']:.4f} ms{_ci(noise.get('plain_ci'))}  "
              f"mean {q['mean']:.4f}  p90 {q['p90']:.4f}  min {q['min']:.4f}  "
              f"std {q['std']:.4f}", file=file)
    if noise.get("message"):
        print(f"noise: {noise['message']}", file=file)
    stable = noise.get("stable")
    if stable:
        print(f"until stable: ±{stable['pct']:.1f} % after {stable['rounds']} runs "
              f"(target ±{stable['target_pct']:g} %"
              f"{'' if stable['reached'] else ', not reached'})", file=file)
    ov = p.overhead
    if ov.get("ratio") is not None:
        print(f"profiling overhead: {ov['ratio']:.2f}x — {ov.get('note', '')}", file=file)
    elif ov.get("ratio_ci"):
        # an overhead below 1 is never a finding: the note says what it means instead
        shown = ("too few runs to tell" if ov.get("label") == "too few runs" else
                 "not measured" if ov.get("significant") else "≈ 1×")
        print(f"profiling overhead: {shown} — {ov.get('note', '')}", file=file)
    line = f"unattributed: {p.unattributed_ms:.4f} ms"
    if p.unattributed:
        line += " (" + ", ".join(u["kernel"] for u in p.unattributed[:5]) + \
            (", …" if len(p.unattributed) > 5 else "") + ")"
    print(f"{line};  between kernels (not traced): {p.untraced_ms:.4f} ms", file=file)
    if p.memory is not None:
        print(p.memory.line(), file=file)
    for note in p.notes:
        if note != noise.get("message"):
            print(f"note: {note}", file=file)


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.4f}, {ci[1]:.4f}]"


def print_roofline(machine: Any, points: list[Any], top: int = 20, file=None) -> None:
    """Operators on this machine's roofline, slowest first."""
    file = file or sys.stdout
    int8 = f", INT8 {machine.peak_int8_gops:.1f} GOP/s peak" if machine.peak_int8_gops else ""
    print(f"roofline: {machine.peak_gflops:.1f} GFLOP/s peak{int8}, {machine.bandwidth_gbs:.1f} "
          f"GB/s, ridge {machine.ridge:.1f} FLOP/byte (operators with known FLOPs; integer "
          "kernels against the INT8 peak; 'cache': above the DRAM roof, data from cache)",
          file=file)
    shown = points if top <= 0 else points[:top]
    rows = [(p.name, p.op_type, f"{p.ms:.4f}", f"{p.intensity:.2f}", f"{p.achieved_gflops:.1f}",
             f"{p.attainable_gflops:.1f}", f"{p.efficiency:.0%}",
             p.describe_bound() + (", int8" if p.precision == "int8" else "")) for p in shown]
    print_table(("operator", "op type", "p50 ms", "FLOP/byte", "GFLOP/s", "attainable",
                 "of roof", "bound"), rows, "llrrrrrl", file=file)
