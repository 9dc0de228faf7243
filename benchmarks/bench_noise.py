"""Does ``compare`` tell noise from a real change, on a quiet machine and on a busy one?

For three GPT-2-style decoder blocks (small, medium, GPT-2-small sized), ``compare`` runs

- A against an identical copy of A: every "significant" verdict is a false positive, per
  operator and for the whole model;
- A against A′ = A with INT8 dynamic quantization of its MatMuls (really faster): the whole
  model and the rewritten MatMuls not called significant are false negatives;

each on a quiet machine and with a background process taking a core 50 % of the time (a Python
child busy-looping in 10 ms on / 10 ms off slices, stopped at the end), ``--repeats`` times.

    python benchmarks/bench_noise.py [--repeats 2] [--runs 20] [--only small]

Target: identical pairs called different in ≤ 5 % of operators and never in total; a change of
2× or more (the whole model or an operator, by its measured median) always significant.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import gpt2_block
from opstudio.core.compare import compare_models
from opstudio.core.optimize import optimize
from opstudio.core.profiler import ProfileSettings
from opstudio.core.recipe import Recipe, Step

MODELS = {  # name: (d, heads, mlp, seq)
    "small": (256, 4, 1024, 32),
    "medium": (512, 8, 2048, 64),
    "gpt2": (768, 12, 3072, 128),
}

# 10 ms busy, 10 ms asleep, until killed: half a core, in slices shorter than a run
_HOG = """
import time
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < 0.010:
        pass
    time.sleep(0.010)
"""


@contextlib.contextmanager
def background_load(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", _HOG])
    try:
        time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        proc.wait(5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2, help="compares per cell (default 2)")
    p.add_argument("--runs", type=int, default=20, help="rounds per compare (default 20)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", choices=list(MODELS))
    args = p.parse_args()

    rows = []
    fp_nodes = fp_total = n_nodes = n_same = 0
    fn_nodes = n_changed = fn_total = n_faster = 0
    big_missed = big = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-noise-") as tmp:
        for name, (d, heads, mlp, seq) in MODELS.items():
            if args.only and name != args.only:
                continue
            model = gpt2_block(d=d, heads=heads, mlp=mlp, seq=seq)
            a, copy, fast = (Path(tmp) / f"{name}_{k}.onnx" for k in ("a", "copy", "int8"))
            onnx.save(model, a)
            onnx.save(model, copy)
            quantized = optimize(model, Recipe([Step("int8-dynamic", {"per_channel": False},
                                                     op_types=["MatMul"])])).model
            onnx.save(quantized, fast)
            quantized_nodes = {n.name for n in model.graph.node if n.op_type == "MatMul"
                               and any(i in {t.name for t in model.graph.initializer}
                                       for i in n.input)}
            settings = ProfileSettings(runs=args.runs, warmup=3, threads=args.threads)
            for busy in (False, True):
                for pair, other in (("same", copy), ("int8", fast)):
                    for rep in range(args.repeats):
                        with background_load(busy):
                            t0 = time.perf_counter()
                            c = compare_models(a, other, settings)
                            secs = time.perf_counter() - t0
                        timed = [r for r in c.nodes if r.ratio is not None]
                        sig = [r for r in timed if r.significant]
                        v = c.verdict
                        if pair == "same":
                            fp_nodes += len(sig)
                            n_nodes += len(timed)
                            fp_total += bool(c.significant) + bool(c.total_ratio.significant)
                            n_same += 2
                            changed = []
                            missed = []
                        else:
                            changed = [r for r in timed if r.name in quantized_nodes
                                       or set(r.group) & quantized_nodes]
                            missed = [r for r in changed if not r.significant]
                            fn_nodes += len(missed)
                            n_changed += len(changed)
                            fn_total += not c.significant
                            n_faster += 1
                        # any row (or total) whose median moved by 2x or more must be called
                        for r in [*timed, c]:
                            s = r.speedup
                            if s is not None and (s >= 2.0 or s <= 0.5):
                                big += 1
                                big_missed += not r.significant
                        rows.append((name, "busy" if busy else "quiet", pair, rep + 1,
                                     f"{v.median:.3f} [{v.low:.3f}, {v.high:.3f}]",
                                     "yes" if c.significant else "no",
                                     f"{len(sig)}/{len(timed)}",
                                     f"{len(missed)}/{len(changed)}" if changed else "-",
                                     c.noise().split(":")[0], f"{secs:.1f}"))
                        print(*rows[-1], sep="  ", flush=True)

    print()
    head = ("model", "machine", "pair", "#", "plain speedup [95 %]", "signif.",
            "nodes signif.", "int8 MatMuls missed", "noise", "s")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for k, row in enumerate([head, *rows]):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print(f"false positives, identical pairs: operators {fp_nodes}/{n_nodes} "
          f"({fp_nodes / max(n_nodes, 1):.1%}), totals (plain and profiled) {fp_total}/{n_same}")
    print(f"false negatives, INT8 pairs: whole model {fn_total}/{n_faster}, "
          f"rewritten MatMuls {fn_nodes}/{n_changed} ({fn_nodes / max(n_changed, 1):.1%})")
    print(f"changes of 2x or more (by median) not called significant: {big_missed}/{big}")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
