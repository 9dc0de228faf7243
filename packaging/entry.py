"""Entry point of the desktop build: the ``opstudio`` command, opening the app when run bare.

The frozen executable also stands in for ``python`` wherever the app starts a child with
``sys.executable``, so it must recognise those calls before anything else:

- multiprocessing's helpers (the forkserver, the resource tracker, ``spawn`` workers) re-run this
  executable with their own arguments; ``freeze_support()`` runs them and exits. The profiler's
  isolation layer starts its children this way, so it has to come first.
- ``opstudio -c CODE [ARG…]`` runs CODE the way ``python -c`` would (the Netron view starts its
  server so). Any other arguments go to the ordinary command line.
"""

from __future__ import annotations

import multiprocessing
import sys


def _run_code(code: str, args: list[str]) -> int:
    sys.argv = ["-c", *args]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(code, "<string>", "exec"), namespace)
    return 0


def main() -> int:
    multiprocessing.freeze_support()
    if len(sys.argv) >= 3 and sys.argv[1] == "-c":
        return _run_code(sys.argv[2], sys.argv[3:])
    from opstudio.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
