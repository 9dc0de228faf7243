"""``opstudio export-olive RECIPE.json --model MODEL -o workflow.json``: the plan for Olive.

Writes the Microsoft Olive workflow config that reproduces the plan's quantization steps with
opstudio's node lists (``core.olive``) and prints each step: the Olive pass it became, or why
it has none.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opstudio.core.errors import OpstudioError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-olive", help="write a plan as a Microsoft Olive workflow",
        description="Write the Olive workflow config (olive run --config workflow.json) that "
                    "reproduces the recipe's quantization steps on the model with the same node "
                    "lists; steps Olive has no ONNX pass for are listed with the reason.")
    p.add_argument("recipe", metavar="RECIPE.json", help="the plan")
    p.add_argument("--model", required=True, metavar="MODEL.onnx", help="the original model")
    p.add_argument("-o", "--output", required=True, metavar="workflow.json",
                   help="where to write the workflow")
    p.add_argument("--output-dir", metavar="DIR",
                   help="where Olive writes its result (default: olive_output beside the "
                        "workflow)")
    p.add_argument("--overwrite", action="store_true", help="replace workflow.json if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from opstudio.core.fileio import write_text_atomic
    from opstudio.core.model.model_io import load_model
    from opstudio.core.plan.olive import olive_workflow
    from opstudio.core.plan.recipe import Recipe

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise OpstudioError(f"{out}: already exists (use --overwrite to replace it)")
    recipe = Recipe.load(args.recipe)
    model = load_model(args.model, lazy=True)
    target = Path(args.output_dir) if args.output_dir else out.absolute().parent / "olive_output"
    export = olive_workflow(recipe, model, args.model, target)
    write_text_atomic(out, json.dumps(export.workflow, indent=2) + "\n",
                      overwrite=args.overwrite)
    for index, technique, olive_pass, nodes in export.passes:
        print(f"step {index} ({technique}) → {olive_pass} on {nodes} node(s)")
    for index, technique, why in export.not_exported:
        print(f"step {index} ({technique}) not exported: {why}")
    for note in export.notes:
        print(f"note: {note}")
    print(f"wrote {out} (run it with: olive run --config {out})")
    return 0
