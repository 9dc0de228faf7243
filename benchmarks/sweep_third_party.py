"""Run ``opstudio optimize`` as a new user would on third-party models and print what came out.

    python benchmarks/sweep_third_party.py /tmp/models [--no-light] [--techniques fp16,int8-dynamic]

Every .onnx under the folder (and by default the ONNX package's own "light" model-zoo models:
IR version 3, weights computed at run time) goes through each technique on MatMul/Gemm/Conv, by
the real command line in a child process of its own (``python -m opstudio optimize``), so one
crash or hang costs one row, not the sweep. Each written file is then checked in another child:
onnx's full checker on the file, and an onnxruntime session.

Outcome per row:

- ``valid``: the command wrote a file, onnx's checker and onnxruntime accept it;
- ``refused``: exit 1 with a one-line ``error:`` message (shown), nothing written;
- ``invalid``: a file was written that the checker or onnxruntime refuses;
- ``traceback``: a Python traceback reached the user;
- ``crash``: killed by a signal, a timeout, or any other exit.

Exit status 1 when any row is invalid, a traceback or a crash. Outputs go to a temp folder that
is removed (``--keep DIR`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OP_TYPES = ["MatMul", "Gemm", "Conv"]
BAD = ("invalid", "traceback", "crash")


@dataclass
class Row:
    model: str
    technique: str
    outcome: str
    detail: str
    checker: str
    seconds: float


def light_models() -> list[Path]:
    import onnx

    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return sorted(folder.glob("light_*.onnx"))


def check_file(path: str) -> int:
    """Child side: onnx's full check of the written file, then an onnxruntime session."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:  # the checker raises several types
        print(f"checker: {str(exc).strip().splitlines()[0][:200]}")
        return 1
    try:
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types
        print(f"onnxruntime: {str(exc).strip().splitlines()[0][:200]}")
        return 1
    print("ok")
    return 0


def run_one(model: Path, technique: str, out_dir: Path, timeout: float) -> Row:
    recipe = out_dir / f"{technique}.json"
    if not recipe.exists():
        recipe.write_text(json.dumps({"version": 1, "steps": [
            {"op_types": OP_TYPES, "technique": technique}]}))
    out = out_dir / f"{model.stem}.{technique}.onnx"
    command = [sys.executable, "-m", "opstudio", "optimize", str(model), "--recipe", str(recipe),
               "-o", str(out), "--overwrite"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return Row(model.name, technique, "crash", f"no answer within {timeout:.0f} s", "",
                   time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if "Traceback (most recent call last)" in done.stderr + done.stdout:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:]
        return Row(model.name, technique, "traceback", last[0] if last else "", "", seconds)
    if done.returncode == 1:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        outcome = "refused" if errors and not out.exists() else "crash"
        return Row(model.name, technique, outcome, errors[0][7:] if errors else done.stderr[-200:],
                   "", seconds)
    if done.returncode != 0 or not out.exists():
        return Row(model.name, technique, "crash", f"exit status {done.returncode}", "", seconds)
    check = subprocess.run([sys.executable, __file__, "--check-file", str(out)],
                           capture_output=True, text=True, timeout=timeout, check=False)
    verdict = (check.stdout.strip().splitlines() or [f"exit status {check.returncode}"])[-1]
    wrote = [line for line in done.stdout.splitlines() if line.startswith("wrote ")]
    unmeasured = [line for line in done.stdout.splitlines() if "not measured" in line]
    sizes = wrote[-1][wrote[-1].rfind(" ("):].strip(" ()") if wrote else ""
    detail = sizes + ("; accuracy not measured" if unmeasured else "")
    outcome = "valid" if check.returncode == 0 else "invalid"
    for path in out_dir.glob(f"{model.stem}.{technique}.onnx*"):
        path.unlink()  # fp16 of a model whose weights are made at run time is hundreds of MiB
    return Row(model.name, technique, outcome, detail, verdict, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="folder searched for .onnx files")
    parser.add_argument("--no-light", action="store_true",
                        help="leave out the ONNX package's light model-zoo models")
    parser.add_argument("--techniques", default="fp16,int8-dynamic")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per command")
    parser.add_argument("--keep", metavar="DIR", help="write the outputs here and keep them")
    parser.add_argument("--check-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check_file:
        return check_file(args.check_file)
    models = [] if args.no_light else light_models()
    if args.folder:
        models += sorted(Path(args.folder).rglob("*.onnx"))
    if not models:
        parser.error("no models: give a folder or leave the light models in")
    techniques = [t.strip() for t in args.techniques.split(",") if t.strip()]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="sweep-") as temp:
        out_dir = Path(args.keep or temp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for model in models:
            for technique in techniques:
                row = run_one(model, technique, out_dir, args.timeout)
                rows.append(row)
                print(f"{row.model:<52} {row.technique:<13} {row.outcome:<9} "
                      f"{row.seconds:6.1f} s  {row.checker:<4} {row.detail}", flush=True)
    print()
    counts = {o: sum(r.outcome == o for r in rows)
              for o in ("valid", "refused", "invalid", "traceback", "crash")}
    print(f"{len(models)} models × {len(techniques)} techniques = {len(rows)} runs: "
          + ", ".join(f"{n} {o}" for o, n in counts.items()))
    refused = [r for r in rows if r.outcome == "refused"]
    if refused:
        print("refusals:")
        for r in refused:
            print(f"  {r.model} {r.technique}: {r.detail}")
    print(f"python {sys.version.split()[0]}, opstudio from {_opstudio_path()}, "
          f"{os.cpu_count()} cores")
    return 1 if any(r.outcome in BAD for r in rows) else 0


def _opstudio_path() -> str:
    import opstudio

    return str(Path(opstudio.__file__).parent)


if __name__ == "__main__":
    sys.exit(main())
