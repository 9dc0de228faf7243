"""Time and peak memory of opening and optimizing a big external-data LLM export.

``--open``: wall time and peak *anonymous* memory (RssAnon summed over the process tree, sampled
every 20 ms: weight files mapped from disk do not count) of ``opstudio inspect`` and of the app
opening the model until its graph is shown (Qt offscreen), on onnxruntime-genai's export of a
random-weight Llama-3.1-8B-shaped model cut to 2 layers (``llm_exports.llama_export``: 5.6 GiB
of fp32 weights). Each ``--code LABEL=APP_DIR`` is one version of opstudio (its ``app`` folder,
put first on PYTHONPATH); the versions take turns run after run, a pause between runs, and the
table gives each one's median over the rounds::

    python benchmarks/bench_big_model.py --open --code before=/path/to/main/app \
        --code after=app [--rounds 3]

``--optimize``: wall time and peak anonymous memory of ``opstudio optimize`` on the same 8B-shaped
export, INT4 on every MatMul + the embedding (Gather → GatherBlockQuantized) and INT8
weight-only on every MatMul, each ``--code`` in turn; then a child that loads the result in
onnxruntime and runs decode steps (past 128): the first, and the median of five more, with the
load's time and peak. A watchdog kills a
run whose process tree passes ``--limit-gib`` of anonymous memory (reported as killed)::

    python benchmarks/bench_big_model.py --optimize --code before=/path/to/main/app \
        --code after=app [--rounds 1]

``--compare``: wall time and peak anonymous memory of ``opstudio compare`` of the 8B-shaped
export against its INT4 (MatMul + Gather) version in decode phase (past 128), each ``--code`` in
turn, with the memory line compare prints. The INT4 model is built once into
``--int4 PATH`` (default: beside the cache's export) by this checkout's ``opstudio optimize``::

    python benchmarks/bench_big_model.py --compare [--int4 /tmp/int4/model.onnx] \
        [--runs 6] [--limit-gib 14]

``--suite``: one table of wall time and peak anonymous memory (process tree) for what a user
does with the export, each command once, with this checkout: ``inspect``; ``profile`` of a
decode step (past 128); ``optimize`` INT4 (MatMul + Gather), INT8 weight-only, fp16 and
int8-dynamic (every MatMul; all four rewrite one weight at a time); ``compare`` of the fp32
export against the INT4 result in decode phase (past 128). ``--model`` picks the export for
every mode: ``llama8b_2l`` (the default: Llama-3.1-8B-shaped, 2 layers, 5.6 GiB) or
``qwen15b`` (Qwen2.5-1.5B-shaped, all 28 layers, 5.8 GiB; ``llm_exports.qwen15b_export``)::

    python benchmarks/bench_big_model.py --suite --model qwen15b [--runs 6] [--limit-gib 12]

Without ``--open``/``--optimize``/``--compare``/``--suite``, ``opstudio optimize``'s time and
peak memory:

An onnxruntime-genai export of a Qwen2.5-0.5B-shaped decoder (24 layers by default: ~1.9 GB of
fp32 weights in ``model.onnx.data``) is optimized with each recipe below in a fresh child
process, so every peak resident set size is that run's alone. The figure to watch is the peak
against the weights' size: the optimizer hands the loaded model to the passes, which rewrite it
in place, so what remains above the weights is the rewrite's own working set (onnxruntime's
quantizer works on the largest tensor, the 545 MB lm_head, in float temporaries) and the
result's load check.

    python benchmarks/bench_big_model.py [--layers 24] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_exports import DEFAULT_CACHE, genai_export, llama_export, qwen15b_export

RECIPES = {
    "int4-weight, every MatMul + embedding": [
        {"op_types": ["MatMul", "Gather"], "technique": "int4-weight", "params": {}}],
    "int8-weight, every MatMul": [
        {"op_types": ["MatMul"], "technique": "int8-weight", "params": {}}],
    "int4-weight, MLP projections only": [
        {"name_pattern": "*/mlp/*_proj/MatMul", "technique": "int4-weight", "params": {}}],
}

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from opstudio.core.plan.optimize import optimize_file
    from opstudio.core.plan.recipe import Recipe
    started = time.perf_counter()
    result = optimize_file(sys.argv[1], Recipe.from_json(json.loads(sys.argv[2])), sys.argv[3])
    print(json.dumps({
        "seconds": time.perf_counter() - started,
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rewritten": sum(len(s.applied) for s in result.steps)}))
""")


INSPECT = "import sys; from opstudio.cli import main; sys.exit(main())"

HERE_APP = str(Path(__file__).resolve().parents[1] / "app")

BIG_RECIPES = {
    "int4 MatMul+Gather": [{"op_types": ["MatMul", "Gather"], "technique": "int4-weight",
                            "params": {}}],
    "int8-weight MatMul": [{"op_types": ["MatMul"], "technique": "int8-weight", "params": {}}],
}

DECODE = textwrap.dedent("""
    import json, sys, time
    import onnxruntime as ort
    from opstudio.core.measure.inputs import make_inputs
    from opstudio.core.model.model_io import load_model
    started = time.perf_counter()
    model = load_model(sys.argv[1], lazy=True)
    feeds = make_inputs(model, phase="decode", past=128, model_path=sys.argv[1])
    del model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
    loaded = time.perf_counter() - started
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    times = []
    for _ in range(6):  # the first step pays for pages mapped from the file; then warm steps
        t0 = time.perf_counter()
        outputs = session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    warm = sorted(times[1:])[len(times[1:]) // 2]
    print(json.dumps({"load_s": loaded, "first_s": times[0], "step_s": warm,
                      "logits": list(outputs[0].shape),
                      "finite": bool(all(o.size == 0 or abs(o).max() < float("inf")
                                         for o in outputs[:1]))}))
""")

APP = textwrap.dedent("""
    import json, os, sys, tempfile, time
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtCore import QSettings
    folder = tempfile.mkdtemp(prefix="bench-settings-")
    for fmt in (QSettings.Format.NativeFormat, QSettings.Format.IniFormat):
        QSettings.setPath(fmt, QSettings.Scope.UserScope, folder)
    from opstudio.qt.app import create_app
    from opstudio.qt.main_window import MainWindow
    app = create_app()
    window = MainWindow(QSettings(os.path.join(folder, "s.ini"), QSettings.Format.IniFormat))
    window.resize(1400, 900)
    window.show()
    app.processEvents()
    started = time.perf_counter()
    opened = window.open_model(sys.argv[1])
    app.processEvents()  # the graph view, the table and the node panel are filled
    print(json.dumps({"opened": opened, "open_s": time.perf_counter() - started,
                      "nodes": len(window.doc.graph.nodes) if window.doc.graph else 0}))
    window.close()
""")


def tree_anon_bytes(root: int) -> int:
    """RssAnon of ``root`` and all its descendants, in bytes."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


class Killed(RuntimeError):
    """The watchdog stopped a run that went over the memory limit."""


def measured(cmd: list[str], env: dict[str, str],
             limit: int | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak anonymous memory of the process tree, and stdout of ``cmd``; above
    ``limit`` bytes the run's process group is killed (the machine is shared)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env,
                                start_new_session=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_anon_bytes(proc.pid))
            if limit is not None and peak > limit:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise Killed(f"killed above {limit / 2**30:.1f} GiB after "
                             f"{time.perf_counter() - started:.0f} s")
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        err.seek(0)
        text_err = err.read()
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {text_err.strip().splitlines()[-1:]}")
    return seconds, peak, text


def bench_optimize(model: Path, codes: dict[str, str], rounds: int, pause: float,
                   limit: int) -> None:
    weights = sum(f.stat().st_size for f in model.parent.glob("model.onnx*"))
    print(f"{model}: {weights / 2**30:.2f} GiB on disk; watchdog at {limit / 2**30:.1f} GiB")
    rows: list[tuple[str, ...]] = []
    for r in range(rounds):
        order = list(codes.items()) if r % 2 == 0 else list(codes.items())[::-1]
        for name, steps in BIG_RECIPES.items():
            for label, app_dir in order:
                env = {**os.environ, "PYTHONPATH": str(Path(app_dir).resolve())}
                with tempfile.TemporaryDirectory(prefix="bench-big-", dir=model.parent.parent) \
                        as folder:
                    recipe = Path(folder) / "recipe.json"
                    recipe.write_text(json.dumps({"version": 1, "steps": steps}))
                    out = Path(folder) / "out" / "model.onnx"
                    out.parent.mkdir()
                    cmd = [sys.executable, "-c", INSPECT, "optimize", str(model), "--recipe",
                           str(recipe), "-o", str(out)]
                    try:
                        seconds, peak, _ = measured(cmd, env, limit)
                    except (Killed, RuntimeError) as exc:
                        rows.append((label, name, "-", "-", "-", "-", "-", str(exc)[:60]))
                        print(f"{label} {name}: {exc}", file=sys.stderr, flush=True)
                        time.sleep(pause)
                        continue
                    size = sum(f.stat().st_size for f in out.parent.glob("model.onnx*"))
                    time.sleep(pause)
                    try:
                        # the result is checked with this checkout's code, whichever wrote it
                        _, dpeak, text = measured([sys.executable, "-c", DECODE, str(out)],
                                                  {**os.environ, "PYTHONPATH": HERE_APP}, limit)
                        step = json.loads(text.strip().splitlines()[-1])
                        decode = (f"{step['load_s']:.1f}", f"{dpeak / 2**30:.2f}",
                                  f"ok {step['first_s'] * 1e3:.0f} / {step['step_s'] * 1e3:.0f} ms"
                                  if step["finite"]
                                  else "not finite")
                    except (Killed, RuntimeError) as exc:
                        decode = ("-", "-", str(exc)[:60])
                    rows.append((label, name, f"{seconds:.1f}", f"{peak / 2**30:.2f}",
                                 f"{size / 2**30:.2f}", *decode))
                    print(f"round {r + 1}/{rounds} {label} {name} done", file=sys.stderr,
                          flush=True)
                time.sleep(pause)
    headers = ("code", "recipe", "optimize s", "peak RssAnon GiB", "output GiB",
               "decode: load s", "decode peak GiB", "decode step: first / warm median")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def bench_open(model: Path, codes: dict[str, str], rounds: int, pause: float) -> None:
    weights = sum(f.stat().st_size for f in model.parent.glob("model.onnx*"))
    print(f"{model}: {weights / 2**30:.2f} GiB on disk")
    figures: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for r in range(rounds):
        for label, app_dir in (list(codes.items()) if r % 2 == 0
                               else list(codes.items())[::-1]):
            env = {**os.environ, "PYTHONPATH": str(Path(app_dir).resolve()),
                   "QT_QPA_PLATFORM": "offscreen"}
            seconds, peak, _ = measured([sys.executable, "-c", INSPECT, "inspect", str(model)],
                                        env)
            figures.setdefault((label, "inspect"), []).append((seconds, peak))
            time.sleep(pause)
            seconds, peak, text = measured([sys.executable, "-c", APP, str(model)], env)
            shown = json.loads(text.strip().splitlines()[-1])
            if not shown["opened"]:
                raise RuntimeError(f"{label}: the app did not open the model")
            figures.setdefault((label, "app: open → graph shown"), []).append(
                (shown["open_s"], peak))
            figures.setdefault((label, "app: whole process"), []).append((seconds, peak))
            time.sleep(pause)
            print(f"round {r + 1}/{rounds} {label} done", file=sys.stderr, flush=True)
    print(f"{'code':10} {'what':26} {'seconds (median)':>17} {'peak RssAnon GiB':>17}")
    for (label, what), runs in figures.items():
        print(f"{label:10} {what:26} {statistics.median(s for s, _ in runs):17.2f} "
              f"{statistics.median(p for _, p in runs) / 2**30:17.3f}")
    labels = list(codes)
    if len(labels) == 2:
        a, b = labels
        for what in ("inspect", "app: open → graph shown"):
            ta = statistics.median(s for s, _ in figures[(a, what)])
            tb = statistics.median(s for s, _ in figures[(b, what)])
            print(f"{what}: {a} / {b} = {ta / tb:.1f}× the time")


def bench_compare(model: Path, int4: Path, codes: dict[str, str], runs: int,
                  limit: int) -> None:
    env = dict(os.environ)
    if not int4.is_file():
        int4.parent.mkdir(parents=True, exist_ok=True)
        recipe = int4.parent / "recipe.json"
        recipe.write_text(json.dumps({"version": 1, "steps": RECIPES[
            "int4-weight, every MatMul + embedding"]}))
        env["PYTHONPATH"] = HERE_APP
        seconds, peak, _ = measured([sys.executable, "-c", INSPECT, "optimize", str(model),
                                     "--recipe", str(recipe), "-o", str(int4)], env, limit)
        print(f"built {int4}: {seconds:.0f} s, peak RssAnon {peak / 2**30:.2f} GiB")
    print(f"{model} vs {int4}; watchdog at {limit / 2**30:.1f} GiB")
    print(f"{'code':10} {'compare s':>10} {'peak RssAnon GiB':>17}  memory lines")
    for label, app_dir in codes.items():
        env["PYTHONPATH"] = app_dir
        cmd = [sys.executable, "-c", INSPECT, "compare", str(model), str(int4),
               "--phase", "decode", "--past", "128", "--runs", str(runs)]
        try:
            seconds, peak, out = measured(cmd, env, limit)
        except (Killed, RuntimeError) as exc:
            print(f"{label:10} {exc}")
            continue
        lines = [li for li in out.splitlines() if "memory:" in li]
        print(f"{label:10} {seconds:10.1f} {peak / 2**30:17.2f}  {lines[0] if lines else '-'}")
        for li in lines[1:]:
            print(f"{'':40}{li}")


SUITE_RECIPES = {
    **BIG_RECIPES,
    "fp16 MatMul": [{"op_types": ["MatMul"], "technique": "fp16", "params": {}}],
    "int8-dynamic MatMul": [{"op_types": ["MatMul"], "technique": "int8-dynamic",
                             "params": {}}],
}


def bench_suite(model: Path, runs: int, limit: int) -> None:
    """Each command once with this checkout: its wall time and peak anonymous memory."""
    weights = sum(f.stat().st_size for f in model.parent.glob("model.onnx*"))
    print(f"{model}: {weights / 2**30:.2f} GiB on disk; watchdog at {limit / 2**30:.1f} GiB")
    env = {**os.environ, "PYTHONPATH": HERE_APP}
    cli = [sys.executable, "-c", INSPECT]
    decode = ["--phase", "decode", "--past", "128", "--runs", str(runs)]
    rows: list[tuple[str, str, str, str]] = []

    def run(what: str, cmd: list[str]) -> str:
        try:
            seconds, peak, out = measured(cli + cmd, env, limit)
        except (Killed, RuntimeError) as exc:
            rows.append((what, "-", "-", str(exc)[:70]))
        else:
            memory = [li.strip() for li in out.splitlines() if li.strip().startswith("memory:")]
            rows.append((what, f"{seconds:.1f}", f"{peak / 2**30:.2f}",
                         memory[0][:110] if memory else ""))
        print(f"{what}: done", file=sys.stderr, flush=True)
        time.sleep(2.0)
        return what

    run("inspect", ["inspect", str(model)])
    run("profile decode (past 128)", ["profile", str(model), *decode])
    with tempfile.TemporaryDirectory(prefix="bench-suite-", dir=model.parent.parent) as folder:
        int4 = None
        for name, steps in SUITE_RECIPES.items():
            recipe = Path(folder) / "recipe.json"
            recipe.write_text(json.dumps({"version": 1, "steps": steps}))
            out = Path(folder) / name.replace(" ", "_").replace("+", "_") / "model.onnx"
            out.parent.mkdir()
            run(f"optimize {name}", ["optimize", str(model), "--recipe", str(recipe), "-o",
                                     str(out)])
            if out.is_file():
                size = sum(f.stat().st_size for f in out.parent.glob("model.onnx*"))
                rows[-1] = (*rows[-1][:3], f"output {size / 2**30:.2f} GiB")
            if name.startswith("int4") and out.is_file():
                int4 = out
            else:
                for f in out.parent.iterdir():
                    f.unlink()  # the disk is shared too
        if int4 is not None:
            run("compare fp32 → INT4 decode (past 128)",
                ["compare", str(model), str(int4), *decode])
    headers = ("command", "wall s", "peak RssAnon GiB", "")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


EXPORTS = {"llama8b_2l": lambda cache: llama_export(2, "fp32", cache=cache),
           "qwen15b": lambda cache: qwen15b_export("fp32", cache=cache)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--open", action="store_true",
                        help="time inspect and the app opening the 8B-shaped 2-layer export")
    parser.add_argument("--optimize", action="store_true",
                        help="time optimize INT4/INT8-weight of the 8B-shaped 2-layer export")
    parser.add_argument("--compare", action="store_true",
                        help="time compare of the 8B-shaped export vs its INT4, decode phase")
    parser.add_argument("--suite", action="store_true",
                        help="one table: inspect, profile decode, optimize INT4/INT8-weight/"
                             "fp16/int8-dynamic, compare fp32 vs INT4 in decode phase")
    parser.add_argument("--model", choices=sorted(EXPORTS), default="llama8b_2l",
                        help="the export --open/--optimize/--compare/--suite run on")
    parser.add_argument("--int4", default=None, help="the INT4 model for --compare")
    parser.add_argument("--runs", type=int, default=6, help="compare's --runs")
    parser.add_argument("--limit-gib", type=float, default=12.0,
                        help="kill a run above this much anonymous memory (default 12)")
    parser.add_argument("--code", action="append", default=[], metavar="LABEL=APP_DIR",
                        help="an opstudio version to run (its app folder); repeatable")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between runs")
    args = parser.parse_args(argv)
    codes = dict(c.split("=", 1) for c in args.code) or {"this": HERE_APP}
    if args.suite:
        bench_suite(EXPORTS[args.model](args.cache), args.runs, int(args.limit_gib * 2**30))
        return 0
    if args.optimize:
        bench_optimize(EXPORTS[args.model](args.cache), codes, args.rounds,
                       args.pause, int(args.limit_gib * 2**30))
        return 0
    if args.compare:
        model = EXPORTS[args.model](args.cache)
        int4 = Path(args.int4) if args.int4 else model.parent.parent / "int4" / "model.onnx"
        bench_compare(model, int4, codes, args.runs, int(args.limit_gib * 2**30))
        return 0
    if args.open:
        bench_open(EXPORTS[args.model](args.cache), codes, args.rounds, args.pause)
        return 0
    source = genai_export(args.layers, "fp32", cache=args.cache)
    weights = sum(f.stat().st_size for f in source.parent.glob("model.onnx*"))
    print(f"{source} ({args.layers} layers): {weights / 2**30:.2f} GiB on disk")
    print(f"{'recipe':40} {'nodes':>6} {'seconds':>8} {'peak RSS GiB':>13} {'peak / size':>12} "
          f"{'output GiB':>11}")
    for name, steps in RECIPES.items():
        with tempfile.TemporaryDirectory(prefix="bench-big-") as folder:
            out = Path(folder) / "model.onnx"
            recipe = json.dumps({"version": 1, "steps": steps})
            run = subprocess.run([sys.executable, "-c", CHILD, str(source), recipe, str(out)],
                                 capture_output=True, text=True, check=False)
            if run.returncode != 0:
                print(f"{name:40} failed: {run.stderr.strip().splitlines()[-1]}")
                continue
            figures = json.loads(run.stdout.strip().splitlines()[-1])
            size = sum(f.stat().st_size for f in out.parent.glob("model.onnx*"))
            print(f"{name:40} {figures['rewritten']:6d} {figures['seconds']:8.1f} "
                  f"{figures['peak_bytes'] / 2**30:13.2f} {figures['peak_bytes'] / weights:11.2f}× "
                  f"{size / 2**30:11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
