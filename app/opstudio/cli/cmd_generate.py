"""``opstudio generate BEFORE.onnx [AFTER.onnx] --prompt "…"``: greedy text side by side.

Each model continues the prompt greedily (``core.generate``); the texts are printed with the
first token where they part marked, and each model's time to first token and tokens/s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opstudio.cli.common import print_table, write_json
from opstudio.cli.progress import progress_line
from opstudio.core.errors import OpstudioError

MARK = "⟦"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="greedy text from a language model and its optimized version",
        description="Continue a prompt greedily with one model, or two side by side (before "
                    "and after optimization): the texts, where they first differ, and each "
                    "model's time to first token and tokens/s. The tokenizer.json beside the "
                    "first model is used unless --tokenizer names one.")
    p.add_argument("models", nargs="+", metavar="MODEL.onnx",
                   help="the model, or the original and the optimized model")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate at most (default 64; an end-of-sequence token "
                        "stops earlier)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="a Hugging Face tokenizer.json (or a folder holding one)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template as the user's turn")
    p.add_argument("--report", metavar="PATH.json|-", help="also write the texts and timings "
                   "as JSON ('-' = stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from opstudio.core.measure.generate import side_by_side_isolated

    if len(args.models) > 2:
        raise OpstudioError("generate takes one model, or two to compare (before and after)")
    for m in args.models:
        if not Path(m).is_file():
            raise OpstudioError(f"{m}: no such file")
    quiet = args.report == "-"
    with progress_line(not quiet) as progress:
        result = side_by_side_isolated([Path(m) for m in args.models], args.prompt,
                              model_path=args.models[0], tokenizer=args.tokenizer,
                              chat=args.chat, max_tokens=args.max_tokens, progress=progress)
    if not quiet:
        print(f"prompt ({result.prompt_tokens} tokens, tokenizer {result.tokenizer}):")
        print(f"  {result.prompt!r}")
        for model, gen in zip(args.models, result.runs):
            print(f"\n{gen.label} — {model}:")
            print(result.marked(gen, MARK) if len(result.runs) == 2 else gen.text)
        print()
        if len(result.runs) == 2:
            at = result.diverges_at
            if at is None:
                print(f"the texts are the same ({len(result.runs[0].tokens)} tokens)")
            else:
                a, b = result.parted()
                print(f"the texts part at generated token {at + 1} (marked {MARK}): "
                      f"{a} vs {b}")
        rows = [(g.label, str(len(g.tokens)) + (" (end of text)" if g.stopped_at_eos else ""),
                 f"{g.first_token_s * 1000:.1f} ms",
                 "-" if g.tokens_per_s is None else f"{g.tokens_per_s:.1f}")
                for g in result.runs]
        print_table(("model", "tokens", "time to first token", "tokens/s"), rows, "llrr")
    if args.report:
        write_json(result.to_json(), args.report)
    return 0

