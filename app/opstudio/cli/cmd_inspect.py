"""``opstudio inspect MODEL``: the operator table and per-op-type summary of a model."""

from __future__ import annotations

import argparse
from typing import Any

import onnx

from opstudio.cli.common import (
    format_shape,
    human_bytes,
    human_count,
    parse_dims,
    parse_shapes,
    print_table,
    write_json,
)
from opstudio.cli.progress import progress_line
from opstudio.core.measure.inputs import decode_step_dims
from opstudio.core.model.graph import GraphInfo, analyze, input_specs
from opstudio.core.model.model_io import load_model
from opstudio.core.model.phases import DEFAULT_DECODE_PAST
from opstudio.core.model.tensor_groups import describe_tensors


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list a model's operators with shapes, FLOPs and weights",
                       description="Print an operator table and a per-op-type summary. "
                                   "Without --dim or --shape, a decoder with a KV cache is "
                                   f"shown at one decode step after a past of "
                                   f"{DEFAULT_DECODE_PAST} tokens.")
    p.add_argument("model", help="path to an .onnx file")
    p.add_argument("--json", metavar="PATH|-", help="also write the analysis as JSON ('-' = stdout)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE",
                   help="bind a symbolic dim for FLOP counts, e.g. --dim seq=128")
    p.add_argument("--shape", action="append", default=[], metavar="INPUT=D0,D1,...",
                   help="whole shape of one input (for dims without names), "
                        "e.g. --shape x=1,3,224,224")
    p.add_argument("--limit", type=int, default=0, metavar="N",
                   help="print only the first N operators (0 = all)")
    p.add_argument("--by-layer", action="store_true",
                   help="also total FLOPs and bytes per layer and module (attention, MLP, "
                        "norms…), read from node names like /model/layers.3/mlp/…")
    p.set_defaults(func=run)


def to_json(path: str, info: GraphInfo, dims: dict[str, int] | None = None,
            assumed: str | None = None) -> dict[str, Any]:
    return {
        "model": path,
        "opset": info.opset,
        "ir_version": info.ir_version,
        "producer": info.producer,
        "dims": dict(dims or {}),
        "dims_assumed": assumed,  # why the dims are what they are when none were given
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": t.shape} for t in info.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": t.shape} for t in info.outputs],
        "nodes": [n.to_json() for n in info.nodes],
        "op_types": info.op_type_counts(),
        "totals": {"nodes": len(info.nodes), "flops": info.total_flops(),
                   "nodes_without_flops": info.flops_unknown(),
                   "unbound_dims": info.unbound_dims(),
                   "param_bytes": info.total_param_bytes()},
        "shape_inference_error": info.shape_inference_error,
    }


def flops_summary(info: GraphInfo) -> tuple[str, str | None]:
    """The footer's FLOPs and, when they are incomplete for want of dims, a line saying which
    to pass: a partial sum over the shape-free nodes would read as a bare "0 FLOPs"."""
    total, unknown = info.total_flops(), info.flops_unknown()
    if not unknown:
        return human_count(total or 0, "FLOPs"), None
    dims = info.unbound_dims()
    if dims:
        flags = " ".join(f"--dim {d}=N" for d in dims)
        return "FLOPs unknown", f"FLOPs need dims: pass {flags}"
    plural = "s" if unknown > 1 else ""
    return f"{human_count(total or 0, 'FLOPs')} + {unknown} operator{plural} of unknown cost", None


def chosen_dims(model: onnx.ModelProto, args: argparse.Namespace
                ) -> tuple[dict[str, int], dict[str, list[int]], str | None]:
    """The dims and shapes to analyse at, and what was assumed when none were given: a
    decoder with a KV cache is shown at one decode step, the step generation repeats."""
    dims, shapes = parse_dims(args.dim), parse_shapes(args.shape)
    if dims or shapes:
        return dims, shapes, None
    decode = decode_step_dims(model, args.model)
    if not decode:
        return dims, shapes, None
    return decode, shapes, f"a decode step at past {DEFAULT_DECODE_PAST}"


def run(args: argparse.Namespace) -> int:
    # a big model's graph takes seconds to read and analyse: say what is going on meanwhile
    with progress_line(args.json != "-") as say:
        if say is not None:
            say(0.0, f"reading the graph of {args.model}")
        model = load_model(args.model, lazy=True)
        dims, shapes, assumed = chosen_dims(model, args)
        if say is not None:
            say(0.5, f"analysing {len(model.graph.node)} operators")
        info = analyze(model, dims, shapes=shapes)
    if args.json == "-":
        write_json(to_json(args.model, info, dims, assumed), "-")
        return 0
    nodes = info.nodes[: args.limit] if args.limit > 0 else info.nodes
    rows = [(n.name, n.op_type if not n.domain else f"{n.domain}:{n.op_type}",
             format_shape(n.output_shapes[0] if n.output_shapes else None),
             human_count(n.flops), human_bytes(n.param_bytes) if n.param_bytes else "")
            for n in nodes]
    print_table(("name", "op type", "output shape", "FLOPs", "params"), rows, "lllrr")
    if args.limit > 0 and len(info.nodes) > args.limit:
        print(f"... {len(info.nodes) - args.limit} more operators")
    print()
    flops_by_type: dict[str, int] = {}
    unknown: dict[str, int] = {}
    for n in info.nodes:
        if n.flops is None:
            unknown[n.op_type] = unknown.get(n.op_type, 0) + 1
        else:
            flops_by_type[n.op_type] = flops_by_type.get(n.op_type, 0) + n.flops
    partial = not info.sums_need_every_node()  # else a partial sum reads as the whole

    def type_flops(op: str) -> str:
        if op not in flops_by_type or (op in unknown and not partial):
            return "–"
        return human_count(flops_by_type[op])

    summary = [(op, count, type_flops(op), f"{unknown[op]} unknown" if op in unknown else "")
               for op, count in info.op_type_counts().items()]
    print_table(("op type", "count", "FLOPs", ""), summary, "lrrl")
    print()
    if args.by_layer:
        from opstudio.cli.by_layer import print_by_layer, weights_once

        print_by_layer([n.name for n in info.nodes], [
            ("FLOPs", {n.name: n.flops for n in info.nodes}, human_count),
            ("weights", weights_once(info), human_bytes),
            ("bytes moved", {n.name: n.bytes_moved for n in info.nodes}, human_bytes)],
            every_node=("FLOPs", "bytes moved") if info.sums_need_every_node() else ())
        print()
    # assumed dims are not the user's: the inputs line keeps the model's own names
    ins = ", ".join(describe_tensors(input_specs(model) if assumed else info.inputs))
    flops, need = flops_summary(info)
    print(f"{len(info.nodes)} operators, {flops}, "
          f"{human_bytes(info.total_param_bytes())} of weights (each tensor once); "
          f"opset {info.opset}")
    if need:
        print(need)
    if assumed:
        print(f"dims not given: shown for {assumed}; --dim NAME=N to choose")
    print(f"inputs: {ins or '(none)'}")
    if info.shape_inference_error:
        print(f"note: shape inference stopped early ({info.shape_inference_error})")
    if args.json:
        write_json(to_json(args.model, info, dims, assumed), args.json)
    return 0
