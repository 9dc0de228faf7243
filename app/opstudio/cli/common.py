"""Argument helpers shared by the subcommands: input flags, output targets, table printing."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opstudio.core.errors import OpstudioError
from opstudio.core.fileio import write_text_atomic
from opstudio.core.model.phases import DEFAULT_DECODE_PAST, PHASES, check_phase, is_past_length_name
from opstudio.core.model.tensors import (
    human_bytes as human_bytes,  # the commands import it from here
)
from opstudio.core.plan.report import json_default


def add_input_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that choose a model's inputs; every command that runs a model takes them."""
    group = parser.add_argument_group("model inputs")
    group.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE",
                       help="value of a named (symbolic) input dim, e.g. --dim seq=128; repeatable")
    group.add_argument("--shape", action="append", default=[], metavar="INPUT=D0,D1,...",
                       help="whole shape of one input, e.g. --shape x=1,3,224,224; repeatable")
    group.add_argument("--inputs", metavar="FILE.npz",
                       help="real input tensors, one array per input name")
    group.add_argument("--phase", choices=PHASES, default=None,
                       help="step of a decoder with a KV cache: 'prefill' runs the prompt "
                            "(past 0, sequence 128 or the prompt's length), 'decode' one new "
                            "token after a past of --past tokens (with a prompt in --inputs: "
                            "after that prompt's real KV cache); default: as the dims say")
    group.add_argument("--past", type=int, default=None, metavar="N",
                       help=f"past (KV cache) length for --phase decode "
                            f"(default {DEFAULT_DECODE_PAST}); implies --phase decode")


def add_text_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the text a language model's accuracy is judged on (and
    calibration runs on) when no --inputs is given: commands that measure accuracy take them."""
    group = parser.add_argument_group("text prompt (a model that reads token ids)")
    group.add_argument("--prompt-text", metavar="FILE",
                       help="judge next-token agreement and KL on this UTF-8 text, tokenized "
                            "with the model's tokenizer (default: a built-in passage of "
                            "English prose); --inputs replaces it")
    group.add_argument("--tokenizer", metavar="FILE",
                       help="the model's Hugging Face tokenizer.json (or a folder holding "
                            "one); default: tokenizer.json beside the model. Without one, "
                            "accuracy is judged on synthetic tokens")


def text_note(accuracy: Any) -> str:
    """What follows the next-token line when it was judged on synthetic tokens."""
    if not getattr(accuracy, "synthetic", False) or not accuracy.summary():
        return ""
    return (" — give the model's tokenizer.json with --tokenizer (or a prompt with "
            "--inputs)")


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise OpstudioError(f"--dim {item!r}: expected NAME=VALUE, e.g. --dim seq=128")
        try:
            n = int(value)
        except ValueError:
            raise OpstudioError(f"--dim {item!r}: {value!r} is not a whole number") from None
        if n < 0 or (n == 0 and not is_past_length_name(name.strip())):
            raise OpstudioError(f"--dim {item!r}: a dim must be at least 1 "
                                "(0 only for a past/cache length)")
        dims[name.strip()] = n
    return dims


def parse_phase(args: argparse.Namespace) -> tuple[str | None, int | None]:
    """``--phase`` and ``--past``, checked together (``--past`` alone means decode)."""
    phase, past = getattr(args, "phase", None), getattr(args, "past", None)
    if past is not None and phase is None:
        phase = "decode"
    check_phase(phase, past)
    return phase, past


def synthetic_past_note(phase: str | None, inputs_path: str | None,
                        judged_on_text: bool = False) -> str | None:
    """A decode step on synthetic inputs has a past of zeros, not a prompt's KV cache: its
    logits are degenerate and say little about accuracy (measured: int4 on every MatMul of a
    trained 135M decoder, cosine 0.78 after a zero past, 0.998 after a real prompt). Judged on
    a text prompt instead, the accuracy is not the decode step's."""
    if phase != "decode" or inputs_path or judged_on_text:
        return None
    return ("note: the decode step ran after a synthetic past of zeros; for accuracy that means "
            "something, give a real prompt with --inputs PROMPT.npz (its KV cache becomes the "
            "past)")


def parse_shapes(items: Sequence[str]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name.strip():
            raise OpstudioError(f"--shape {item!r}: expected INPUT=D0,D1,..., e.g. --shape x=1,3,224,224")
        try:
            dims = [int(v) for v in value.split(",")] if value.strip() else []
        except ValueError:
            raise OpstudioError(f"--shape {item!r}: dims must be whole numbers") from None
        if any(d < 0 for d in dims):
            raise OpstudioError(f"--shape {item!r}: dims cannot be negative")
        shapes[name.strip()] = dims
    return shapes


def write_json(data: Any, target: str) -> None:
    """Write ``data`` as JSON to a path, or to stdout when ``target`` is ``-``."""
    text = json.dumps(data, indent=2, sort_keys=False, default=json_default)
    if target == "-":
        sys.stdout.write(text + "\n")
        return
    write_text_atomic(Path(target), text + "\n", overwrite=True)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                align: str | None = None, file=None) -> None:
    """Plain fixed-width table; ``align`` has one of 'l'/'r' per column."""
    file = file or sys.stdout
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align or "l" * len(headers)
    for k, row in enumerate(cells):
        parts = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)]
        print("  ".join(parts).rstrip(), file=file)
        if k == 0:
            print("  ".join("-" * w for w in widths), file=file)


def human_count(n: float | int | None, unit: str = "") -> str:
    if n is None:
        return "?"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {suffix}{unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip() if isinstance(n, float) else f"{n} {unit}".rstrip()


def format_shape(shape: list | None) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"
