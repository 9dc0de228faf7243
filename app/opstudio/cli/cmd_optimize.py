"""``opstudio optimize MODEL --recipe R.json -o OUT.onnx``: apply a recipe and report.

Prints, per step, the nodes rewritten with their key figures and the nodes skipped with the
reason, then the accuracy of the result against the original on the same inputs (synthetic,
or ``--inputs``). When those inputs cannot be made (a dim with no value) or the original model
does not run on them, the model is still written and the accuracy is said to be not measured,
with the flag that would measure it; a technique that calibrates on inputs refuses instead,
naming that flag. The input model is never overwritten, an existing output only with
``--overwrite``, and nothing is written when a step fails or when the recipe rewrites no node
at all (exit 1, with each step's reasons summarised).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from opstudio.cli.common import (
    add_input_flags,
    add_text_flags,
    human_bytes,
    human_count,
    parse_dims,
    parse_phase,
    parse_shapes,
    print_table,
    synthetic_past_note,
    text_note,
    write_json,
)
from opstudio.cli.progress import progress_line
from opstudio.core.errors import OpstudioError
from opstudio.core.model.model_io import load_model, same_file, save_model, stored_bytes
from opstudio.core.plan.deploy import (
    check_loads,
    check_target,
    runtime_kind,
    wants_folder,
    write_folder,
)

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
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx|DIR/",
                   help="where to write the optimized model; a folder (DIR/, or one that "
                        "exists) for a model in an onnxruntime-genai or HF/optimum folder "
                        "writes a folder that runtime loads: the model, its config updated "
                        "for the plan, the tokenizer and generation files")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT.onnx if it exists (with DIR/: write into a folder that "
                        "is not empty, replacing the files the export writes)")
    p.add_argument("--report", metavar="PATH.json|-",
                   help="also write the step reports and accuracy as JSON ('-' = stdout)")
    p.add_argument("--seed", type=int, default=0, help="seed for synthetic inputs (default 0)")
    add_input_flags(p)
    add_text_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from opstudio.core.measure.accuracy import compare_outputs, run_outputs
    from opstudio.core.measure.inputs import NeedsInputs
    from opstudio.core.measure.settings import FeedSpec
    from opstudio.core.measure.workload import Workload
    from opstudio.core.plan.optimize import optimize
    from opstudio.core.plan.recipe import Recipe

    src, dst = Path(args.model), Path(args.output)
    folder: Path | None = None
    if wants_folder(args.output):
        if runtime_kind(src) is not None:
            folder = dst
            check_target(src, folder, overwrite=args.overwrite)
            dst = folder / src.name
        else:  # a model on its own is written as a file, into that folder
            if not dst.is_dir():
                raise OpstudioError(f"{dst}: no such folder")
            dst = dst / src.name
    if folder is None:
        if same_file(src, dst) or src.resolve() == dst.resolve():
            raise OpstudioError(f"{dst}: is the input model; choose another output file")
        if dst.exists() and not args.overwrite:
            raise OpstudioError(f"{dst}: already exists (use --overwrite to replace it)")
    recipe = Recipe.load(args.recipe)
    model = load_model(src, lazy=True)
    phase, past = parse_phase(args)
    dims = parse_dims(args.dim)
    # only the accuracy check needs inputs; a technique that calibrates makes its own and
    # refuses, naming the flag, when it cannot
    workload = Workload(model, FeedSpec(dims=dims, shapes=parse_shapes(args.shape),
                                        inputs_path=args.inputs, seed=args.seed, phase=phase,
                                        past=past, prompt_text=args.prompt_text,
                                        tokenizer=args.tokenizer), src)
    inputs, not_measured = None, ""
    try:
        inputs = workload.main()
    except NeedsInputs as exc:
        not_measured = f"{exc.why}; to measure it, {exc.remedy}"
    # a language model is calibrated and judged on a text when its tokenizer is at hand
    judge = workload.judging()
    judged = judge.feed if judge.feed is not None else inputs
    # the optimizer takes the model over (its weights are read once, into it)
    quiet = args.report == "-"
    with progress_line(not quiet) as progress:
        result = optimize(model, recipe, inputs=judged, consume=True, progress=progress)
    del model
    # written first, then judged from the files: a failed check never loses the result
    export = None
    if folder is not None:
        export = write_folder(result.model, src, folder, steps=result.steps,
                              overwrite=args.overwrite)
    else:
        save_model(result.model, dst, overwrite=args.overwrite)
    accuracy = None
    if judged is not None:
        try:
            reference = run_outputs(src, judged)
        except OpstudioError as exc:  # the inputs do not fit the model: not the result's fault
            given = "the given" if args.inputs else "synthetic"
            cause = (str(exc.__cause__ or exc).strip().splitlines() or [""])[0][:200]
            not_measured = (f"onnxruntime could not run the original model on {given} inputs "
                            f"({cause}); to measure it, pass inputs it runs on with --inputs, "
                            "--dim or --shape")
        else:
            try:
                accuracy = compare_outputs(reference, run_outputs(dst, judged))
            except OpstudioError as exc:
                raise OpstudioError(
                    f"wrote {dst}, but could not check its accuracy: {exc}") from exc
            accuracy.judged_on = judge.judged_on
    size_before, size_after = stored_bytes(src), stored_bytes(dst)

    if not quiet:
        for step in result.steps:
            _print_step(step)
        if accuracy is None:
            print(f"accuracy vs the original: not measured, {not_measured}")
        else:
            on = (f" (inputs from {args.inputs})" if args.inputs else
                  f", judged on {judge.judged_on}" if judge.feed is not None else
                  " (synthetic inputs)")
            _print_accuracy(accuracy, on)
            note = synthetic_past_note(phase, args.inputs,
                                       judged_on_text=judge.feed is not None)
            if note:
                print(note)
        print(f"wrote {dst} ({human_bytes(size_after)}, was {human_bytes(size_before)})")
        if export is not None:
            _print_folder(export)
    if export is not None:
        from opstudio.core.isolation import call_isolated

        # in a child, as every run of the model: a runtime that crashes leaves the folder
        checked = call_isolated(check_loads, export, label="the runtime",
                                task="loading the written folder")
        if not quiet:
            print(checked or "onnxruntime-genai is not installed: the folder was not run in it "
                             "(pip install onnxruntime-genai)")
    if args.report:
        measured = ({"accuracy": accuracy.to_json()} if accuracy is not None
                    else {"accuracy": None, "accuracy_not_measured": not_measured})
        write_json({"model": str(src), "output": str(dst), "recipe": recipe.to_json(),
                    **result.to_json(), **measured,
                    "size_bytes": {"before": size_before, "after": size_after},
                    **({"folder": {"path": str(export.folder), "runtime": export.kind,
                                   "runtimes": export.runtimes,
                                   "files": export.written, "config_changes": export.changed,
                                   "notes": export.notes}} if export is not None else {})},
                   args.report)
    return 0


def _print_accuracy(accuracy: Any, on: str) -> None:
    print(f"accuracy vs the original{on}:")
    rows = [(o.name, "[" + ",".join(map(str, o.shape)) + "]", _num(o.max_abs_err),
             _num(o.mean_abs_err), _num(o.cosine, 6), _snr(o.snr_db),
             "" if o.top1_agreement is None else f"{o.top1_agreement:.1%}",
             _num(o.kl_divergence) if o.kl_divergence is not None else "")
            for o in accuracy.outputs]
    print_table(("output", "shape", "max abs err", "mean abs err", "cosine", "SNR dB",
                 "top-1", "KL nats"), rows, "llrrrrrr")
    if accuracy.summary():
        print(accuracy.summary() + text_note(accuracy))


def _print_folder(export: Any) -> None:
    names = {"genai": "onnxruntime-genai", "hf": "HF/optimum"}
    runtime = " and ".join(names[k] for k in export.runtimes or [export.kind])
    print(f"wrote the {runtime} folder {export.folder}: {', '.join(export.written)}")
    for key, value in export.changed.items():
        print(f"  config: {key} = {value}")
    for note in export.notes:
        print(f"  note: {note}")


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
