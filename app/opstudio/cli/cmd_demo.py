"""``opstudio demo``: the desktop app on the bundled demo LLM."""

from __future__ import annotations

import argparse

from opstudio.cli.cmd_gui import add_window_flags, launch
from opstudio.resources import DEMO_MODELS, demo_model_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="open the desktop app on a bundled demo model",
                       description="Open the desktop app on a bundled demo model.")
    p.add_argument("--model", default="tiny_llm", choices=sorted(DEMO_MODELS),
                   help="which demo model (default: tiny_llm)")
    add_window_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return launch(demo_model_path(args.model), args)
