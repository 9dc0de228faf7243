"""Check ``opstudio inspect`` on every .onnx file under a folder and print a table.

    python benchmarks/check_inspect_real_models.py /work/models [--size 64]

For each model: the top-level node count (``inspect --json`` against ``len(graph.node)``), the
number of MatMul/Gemm/Conv-like nodes, how many of them get FLOPs as the file declares its
inputs, and how many once every input dim is bound (named dims through ``--dim``, unnamed ones
through whole input shapes: the first dim 1, batch-named dims 1, the others ``--size``). A node
without FLOPs is listed with its reason. Exit status 1 if a node count differs, ``inspect``
fails, or a heavy node whose shapes are known still lacks FLOPs once all dims are bound (shapes
no static analysis can give — a custom op's output, an ``If`` whose branches differ — are
listed as "shape unknown").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

from opstudio.cli import main as cli_main
from opstudio.core.model.graph import GraphInfo, analyze, input_specs
from opstudio.core.model.model_io import load_model

HEAVY = {"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "ConvInteger",
         "QLinearMatMul", "QLinearConv", "FusedMatMul", "MatMulNBits"}


def bound_inputs(model: onnx.ModelProto, size: int) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Values for every named dim, and whole shapes for inputs with unnamed dims."""
    dims: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for spec in input_specs(model):
        if spec.shape is None:
            continue
        concrete = []
        for pos, d in enumerate(spec.shape):
            if isinstance(d, int) and d >= 0:
                concrete.append(d)
                continue
            value = 1 if pos == 0 or (isinstance(d, str) and "batch" in d.lower()) else size
            if isinstance(d, str):
                value = dims.setdefault(d, value)
            concrete.append(value)
        if any(not (isinstance(d, int) and d >= 0) and not isinstance(d, str) for d in spec.shape):
            shapes[spec.name] = concrete
    return dims, shapes


def reason(info: GraphInfo, node) -> str:
    names = [x for x in node.inputs[:2] + node.outputs[:1] if x]
    shapes = [info.tensors[x].shape if x in info.tensors else None for x in names]
    if any(s is None for s in shapes):
        return "shape unknown"
    if any(isinstance(d, str) for s in shapes for d in s):
        return "symbolic dims"
    return "unknown dims"


def inspect_json(path: Path, extra: list[str]) -> tuple[int, dict | None, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "inspect.json"
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = cli_main(["inspect", str(path), "--json", str(out), *extra])
        data = json.loads(out.read_text()) if code == 0 and out.exists() else None
    return code, data, err.getvalue().strip()


def check(path: Path, size: int) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    raw = onnx.load(str(path), load_external_data=False)
    t0 = time.perf_counter()
    code, data, err = inspect_json(path, [])
    t_cli = time.perf_counter() - t0
    if code != 0 or data is None:
        return [path.name, "-", "-", "-", "-", "-", f"{t_cli:.2f}", f"inspect failed: {err}"], \
            [f"{path}: inspect exit {code}: {err}"]
    if len(data["nodes"]) != len(raw.graph.node):
        problems.append(f"{path}: inspect lists {len(data['nodes'])} nodes, graph has "
                        f"{len(raw.graph.node)}")

    model = load_model(path)
    t0 = time.perf_counter()
    info = analyze(model)
    t_plain = time.perf_counter() - t0
    heavy = [n for n in info.nodes if n.op_type in HEAVY]
    missing = [n for n in heavy if n.flops is None]
    why: dict[str, int] = {}
    for n in missing:
        r = reason(info, n)
        why[r] = why.get(r, 0) + 1

    dims, shapes = bound_inputs(model, size)
    t0 = time.perf_counter()
    bound = analyze(model, dims, shapes=shapes)
    t_bound = time.perf_counter() - t0
    still = [n for n in bound.nodes if n.op_type in HEAVY and n.flops is None]
    unknown_after = {}
    for n in still:
        r = reason(bound, n)
        unknown_after[r] = unknown_after.get(r, 0) + 1
        # A shape nothing static can give (a custom op's output, an If whose branches differ)
        # is reported, not counted as a failure; known shapes without FLOPs are.
        if r != "shape unknown":
            problems.append(f"{path}: {n.name} ({n.op_type}) has no FLOPs with all dims bound "
                            f"({r})")
    extra = [f"--dim={k}={v}" for k, v in dims.items()]
    extra += [f"--shape={k}={','.join(map(str, v))}" for k, v in shapes.items()]
    if extra:  # the CLI must give the same numbers
        code, bdata, err = inspect_json(path, extra)
        cli_missing = sum(1 for n in (bdata or {}).get("nodes", [])
                          if n["op_type"] in HEAVY and n["flops"] is None)
        if code != 0 or cli_missing != len(still):
            problems.append(f"{path}: inspect {' '.join(extra)} gives {cli_missing} heavy nodes "
                            f"without FLOPs (exit {code} {err})")
    note = ", ".join(f"{v} {k}" for k, v in why.items())
    binding = " ".join(f"{k}={v}" for k, v in dims.items())
    binding += " " + " ".join(f"{k}={v}" for k, v in shapes.items()) if shapes else ""
    row = [str(path), str(len(info.nodes)), str(len(heavy)), str(len(heavy) - len(missing)),
           f"{len(missing)}" + (f" ({note})" if note else ""),
           f"{len(heavy) - len(still)}" + (f" [{binding.strip()}]" if binding.strip() else "")
           + "".join(f"; {v} {k}" for k, v in unknown_after.items()),
           f"{t_plain:.2f}/{t_bound:.2f}/{t_cli:.2f}", "ok" if not problems else "PROBLEM"]
    return row, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", default=["/work/models"])
    parser.add_argument("--size", type=int, default=64,
                        help="value for unbound non-batch dims (default 64)")
    args = parser.parse_args(argv)
    paths = sorted(p for f in args.folders for p in Path(f).rglob("*.onnx"))
    headers = ["model", "nodes", "mm/gemm/conv", "with FLOPs", "without FLOPs (why)",
               "with FLOPs, dims bound", "analyze s plain/bound/cli", "status"]
    rows, problems = [], []
    for p in paths:
        row, probs = check(p, args.size)
        root = next((Path(f) for f in args.folders if p.is_relative_to(Path(f))), None)
        row[0] = str(p.relative_to(root)) if root else str(p)
        rows.append(row)
        problems.extend(probs)
        print(" | ".join(row), file=sys.stderr, flush=True)
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n{len(paths)} models, {len(problems)} problems")
    for pr in problems:
        print(f"- {pr}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
