"""The ``opstudio`` command line.

Each subcommand lives in its own ``cmd_<name>.py`` module exposing ``register(subparsers)``,
which adds its parser and sets ``func`` to a handler ``(args) -> int``. Exit codes: 0 success,
2 usage error (argparse), 1 any other error, printed as one ``error: …`` line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from opstudio import __version__
from opstudio.core.errors import ContractBroken, OpstudioError

# Order here is the order in ``opstudio --help``.
COMMANDS = ("gui", "demo", "inspect", "profile", "optimize", "compare", "advise", "generate",
            "export-olive")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opstudio",
        description="Profile ONNX models operator by operator and optimize the operators that "
                    "matter: low-rank factorization, pruning, INT8/INT4/FP16 quantization.",
    )
    parser.add_argument("--version", action="version", version=f"opstudio {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback when something fails")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"opstudio.cli.cmd_{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:
            if exc.name != f"opstudio.cli.cmd_{name.replace('-', '_')}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:
        # Plain `opstudio` opens the app on its welcome page.
        args = parser.parse_args([*argv, "gui"])
    try:
        return int(args.func(args) or 0)
    except OpstudioError as exc:
        return _fail(str(exc), args.debug)
    except ContractBroken as exc:
        return _defect(exc)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except MemoryError:
        return _fail("out of memory", args.debug)
    except Exception as exc:  # anything unforeseen still ends in one readable line
        return _fail(f"unexpected {type(exc).__name__}: {exc}", args.debug)


def gui_main() -> int:
    return main(["gui", *sys.argv[1:]])


def _defect(exc: ContractBroken) -> int:
    # not the user's doing: the traceback is what a report needs, so it is always shown
    traceback.print_exc()
    print(getattr(exc, "child_traceback", ""), end="", file=sys.stderr)
    print(f"error: internal error: {exc.report_line()}", file=sys.stderr)
    return 1


def _fail(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    print(f"error: {first}", file=sys.stderr)
    return 1
