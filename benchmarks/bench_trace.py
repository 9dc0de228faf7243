"""Reading onnxruntime's profiling trace: opstudio's line reader against the JSON parser.

A generated chain of ``--nodes`` small operators is run ``--runs`` times with onnxruntime's
profiler on (the same shape of trace as a 10k-operator LLM graph profiled 100 times: close to
onnxruntime's cap of a million events, ~800 MiB of JSON). The table times, on that one file:
``read_trace`` (a regular expression per line, what the profiler uses), ``read_trace`` with
the JSON parser per line, and ``json.load`` of the whole file.

    python benchmarks/bench_trace.py [--nodes 10000] [--runs 103]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load import chain_model
from opstudio.core.measure.profiler import read_trace


def main() -> int:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=103)
    args = p.parse_args()
    ort.set_default_logger_severity(4)  # the cap is reported once per dropped event
    with tempfile.TemporaryDirectory(prefix="opstudio-bench-") as tmp:
        path = Path(tmp) / "chain.onnx"
        onnx.save(chain_model(args.nodes), path)
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "trace")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feeds = {i.name: np.ones([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
                 for i in sess.get_inputs()}
        for _ in range(args.runs):
            sess.run(None, feeds)
        trace = sess.end_profiling()
        size = os.path.getsize(trace) / 2**20
        print(f"{args.nodes:,} operators × {args.runs} runs: trace {size:.0f} MiB")
        print(f"{'reader':<34} {'seconds':>8} {'events kept':>12}")
        for label, fast in (("read_trace (line regex)", True), ("read_trace (JSON per line)", False)):
            t0 = time.perf_counter()
            events = read_trace(trace, fast=fast)
            print(f"{label:<34} {time.perf_counter() - t0:>8.1f} {len(events):>12,}")
        t0 = time.perf_counter()
        with open(trace, encoding="utf-8") as fh:
            whole = json.load(fh)
        print(f"{'json.load of the whole file':<34} {time.perf_counter() - t0:>8.1f} "
              f"{len(whole):>12,} (all events)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
