"""``opstudio optimize MODEL --recipe R.json -o OUT.onnx``: apply a recipe and report.

Prints, per step, the nodes rewritten with their key figures and the nodes skipped with the
reason, then the accuracy of the result against the original on the same inputs (synthetic,
or ``--inputs``). The input model is never overwritten, an existing output only with
``--overwrite``, and nothing is written when a step fails or when the recipe rewrites no node
at all (exit 1, with each step's reasons summarised).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from opstudio.cli.common import (
    add_input_flags,
    clear_progress,
    human_bytes,
    human_count,
    parse_dims,
    parse_phase,
    parse_shapes,
    print_table,
    progress_printer,
    synthetic_past_note,
    write_json,
)
from opstudio.core.errors import OpstudioError
from opstudio.core.model_io import load_model, same_file, save_model, stored_bytes

MAX_SKIPPED_SHOWN = 12
# Figures shown first, in this order; "<x>_before"/"<x>_after" pairs print as "x a → b".
_ORDER = ("rank", "energy", "rel_error", "sparsity", "params", "flops", "bytes")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optimize", help="apply an optimization recipe to chosen operators",
        description="Apply a recipe (low-rank, pruning, INT8/INT4/FP16 quantization per node) "
                    "and report what each step did and the accuracy against the original.")
    p.add_argument("model", help="path to the original .onnx file")
    p.add_argument("--recipe", required=True, metavar="R.json", help="the recipe to apply")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx",
                   help="where to write the optimized model")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.onnx if it exists")
    p.add_argument("--report", metavar="PATH.json|-",
                   help="also write the step reports and accuracy as JSON ('-' = stdout)")
    p.add_argument("--seed", type=int, default=0, help="seed for synthetic inputs (default 0)")
    add_input_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from opstudio.core.accuracy import evaluate
    from opstudio.core.inputs import make_inputs
    from opstudio.core.optimize import optimize
    from opstudio.core.recipe import Recipe

    src, dst = Path(args.model), Path(args.output)
    if same_file(src, dst) or src.resolve() == dst.resolve():
        raise OpstudioError(f"{dst}: is the input model; choose another output file")
    if dst.exists() and not args.overwrite:
        raise OpstudioError(f"{dst}: already exists (use --overwrite to replace it)")
    recipe = Recipe.load(args.recipe)
    model = load_model(src, lazy=True)
    phase, past = parse_phase(args)
    inputs = make_inputs(model, dims=parse_dims(args.dim), shapes=parse_shapes(args.shape),
                         npz_path=args.inputs, seed=args.seed, phase=phase, past=past,
                         model_path=src)
    # the optimizer takes the model over (its weights are read once, into it)
    quiet = args.report == "-"
    progress = None if quiet else progress_printer()
    try:
        result = optimize(model, recipe, inputs=inputs, consume=True, progress=progress)
    finally:
        if progress is not None:
            clear_progress()
    del model
    # written first, then judged from the files: a failed check never loses the result
    save_model(result.model, dst, overwrite=args.overwrite)
    try:
        accuracy = evaluate(src, dst, inputs)
    except OpstudioError as exc:
        raise OpstudioError(f"wrote {dst}, but could not check its accuracy: {exc}") from exc
    size_before, size_after = stored_bytes(src), stored_bytes(dst)

    if not quiet:
        for step in result.steps:
            _print_step(step)
        print("accuracy vs the original "
              f"({'inputs from ' + args.inputs if args.inputs else 'synthetic inputs'}):")
        rows = [(o.name, "[" + ",".join(map(str, o.shape)) + "]", _num(o.max_abs_err),
                 _num(o.mean_abs_err), _num(o.cosine, 6), _snr(o.snr_db),
                 "" if o.top1_agreement is None else f"{o.top1_agreement:.1%}",
                 _num(o.kl_divergence) if o.kl_divergence is not None else "")
                for o in accuracy.outputs]
        print_table(("output", "shape", "max abs err", "mean abs err", "cosine", "SNR dB",
                     "top-1", "KL nats"), rows, "llrrrrrr")
        if accuracy.summary():
            print(accuracy.summary())
        note = synthetic_past_note(phase, args.inputs)
        if note:
            print(note)
        print(f"wrote {dst} ({human_bytes(size_after)}, was {human_bytes(size_before)})")
    if args.report:
        write_json({"model": str(src), "output": str(dst), "recipe": recipe.to_json(),
                    **result.to_json(), "accuracy": accuracy.to_json(),
                    "size_bytes": {"before": size_before, "after": size_after}},
                   args.report)
    return 0


def _print_step(step: Any) -> None:
    params = ", ".join(f"{k}={v}" for k, v in step.params.items() if v is not None)
    print(f"step {step.index}: {step.technique}" + (f" ({params})" if params else "")
          + f" — {len(step.applied)} node(s) rewritten, {len(step.skipped)} skipped, "
            f"{step.seconds:.2f} s")
    if step.applied:
        rows = [(name, _figures(step.details.get(name, {}))) for name in step.applied]
        print_table(("node", "figures"), rows)
    skipped = list(step.skipped.items())
    for name, reason in skipped[:MAX_SKIPPED_SHOWN]:
        print(f"  skipped {name}: {reason}")
    if len(skipped) > MAX_SKIPPED_SHOWN:
        print(f"  ... {len(skipped) - MAX_SKIPPED_SHOWN} more skipped (see --report)")
    for note in step.notes:
        print(f"  note: {note}")
    print()


def _figures(details: dict[str, Any]) -> str:
    parts: list[str] = []
    done: set[str] = set()
    keys = sorted(details, key=lambda k: (_rank(k), k))
    for key in keys:
        if key in done:
            continue
        value = details[key]
        if key.endswith("_before") and key[:-7] + "_after" in details:
            base = key[:-7]
            after = details[base + "_after"]
            done.update({key, base + "_after"})
            if not value and not after:
                continue  # e.g. an activation has no weight bytes to speak of
            fmt = human_bytes if base == "bytes" else human_count
            parts.append(f"{base} {fmt(value)} → {fmt(after)}")
            continue
        if key.endswith("_after") and key[:-6] + "_before" in details:
            continue
        done.add(key)
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _rank(key: str) -> int:
    for i, name in enumerate(_ORDER):
        if key == name or key.startswith(name + "_"):
            return i
    return len(_ORDER)


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}"


def _snr(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "inf"
    return f"{value:.1f}"
