"""Load: big graphs, many runs and a 1 GB external-data model, with the UI kept responsive.

    python benchmarks/bench_load.py [--nodes 10000] [--runs 100] [--gb 1.0]

Part 1 opens a generated model of ``--nodes`` operators in the real main window (offscreen),
profiles it ``--runs`` times through the window's worker, and measures how long the Qt event
loop was blocked meanwhile (a 5 ms timer records the gaps between its ticks; target: no stall
over 100 ms during the run). Part 2 writes a model whose weights (``--gb`` GiB of float32) live
in an external-data file, then inspects and profiles it and reports peak resident memory of this
process and of the onnxruntime child against the model size. Nothing is stored: every model is
generated into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def chain_model(n: int) -> onnx.ModelProto:
    """``n`` small elementwise operators in a chain with a few side branches (LLM-sized count)."""
    nodes, inits = [], [numpy_helper.from_array(np.full((1, 64), 0.999, np.float32), "c")]
    prev = "x"
    ops = ("Mul", "Add", "Relu", "Sigmoid")
    for i in range(n):
        op = ops[i % len(ops)]
        out = f"t{i}"
        ins = [prev, "c"] if op in ("Mul", "Add") else [prev]
        nodes.append(helper.make_node(op, ins, [out], name=f"n{i}"))
        prev = out
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 64])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def big_external_model(folder: Path, gib: float) -> Path:
    """MatMul layers whose float32 weights add up to ``gib`` GiB, stored as external data."""
    d = 8192
    per_layer = d * d * 4
    layers = max(1, round(gib * 2**30 / per_layer))
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = f"w{i}"
        inits.append(numpy_helper.from_array(
            rng.standard_normal((d, d), dtype=np.float32) * np.float32(1 / np.sqrt(d)), w))
        nodes.append(helper.make_node("MatMul", [prev, w], [f"h{i}"], name=f"fc{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, d])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "big.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.onnx.data", size_threshold=1024)
    return path


class DescendantPeak:
    """Samples the resident memory of this process's descendants (the onnxruntime child is a
    grandchild under the fork server, so getrusage(RUSAGE_CHILDREN) does not see it)."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DescendantPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.05):
            parents: dict[int, int] = {}
            rss: dict[int, int] = {}
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry.name}/status") as fh:
                        fields = dict(line.split(":", 1) for line in fh if ":" in line)
                    parents[int(entry.name)] = int(fields["PPid"])
                    rss[int(entry.name)] = int(fields.get("VmRSS", "0 kB").split()[0])
                except (OSError, ValueError, KeyError):
                    continue
            for pid, kib in rss.items():
                p, hops = pid, 0
                while p in parents and p != me and hops < 8:
                    p, hops = parents[p], hops + 1
                if p == me and pid != me:
                    self.peak_kib = max(self.peak_kib, kib)


def ui_part(nodes: int, runs: int, tmp: Path) -> None:
    from PySide6.QtCore import QElapsedTimer, QSettings, QTimer
    from PySide6.QtWidgets import QApplication

    from opstudio.core.measure.profiler import ProfileSettings
    from opstudio.qt.app import create_app
    from opstudio.qt.main_window import MainWindow

    path = tmp / "chain.onnx"
    onnx.save(chain_model(nodes), path)
    QApplication.instance() or QApplication([])
    create_app()
    window = MainWindow(QSettings(str(tmp / "s.ini"), QSettings.Format.IniFormat))
    window.resize(1600, 1000)
    window.show()
    gaps: list[float] = []
    clock = QElapsedTimer()
    timer = QTimer()
    timer.setInterval(5)

    def tick() -> None:
        gaps.append(clock.restart())

    timer.timeout.connect(tick)
    t0 = time.perf_counter()
    clock.start()
    timer.start()
    window.open_model(path)  # the loading runs in the worker; the window keeps its loop
    QApplication.processEvents()
    timer.stop()
    open_s = time.perf_counter() - t0
    open_gaps = np.array(gaps[1:] or [0.0])
    gaps.clear()
    window.set_run_settings(ProfileSettings(runs=runs, warmup=3, threads=1, timeout_s=1800))

    with DescendantPeak() as child_mem:
        t0 = time.perf_counter()
        worker = window.run_profile()
        clock.start()
        timer.start()
        while not worker.is_done():
            QApplication.processEvents()
            time.sleep(0.001)
        QApplication.processEvents()
        timer.stop()
        run_s = time.perf_counter() - t0
    stalls = np.array(gaps[1:] or [0.0])
    prof = window.profile
    print(f"\n{nodes:,}-node model, {runs} profiled runs in the window's worker")
    print(f"  open (load + analyze + layout in the worker): {open_s:.2f} s; event-loop gaps "
          f"meanwhile: median {np.median(open_gaps):.1f} ms, max {open_gaps.max():.1f} ms "
          "(the graph view's first paint of the new model comes after)")
    print(f"  profile run: {run_s:.1f} s; {len(prof.nodes) if prof else 0:,} rows attributed; "
          f"median run {prof.total_ms['p50']:.2f} ms" if prof else "  profile failed")
    print(f"  event-loop gaps during the run: median {np.median(stalls):.1f} ms, "
          f"p99 {np.percentile(stalls, 99):.1f} ms, max {stalls.max():.1f} ms "
          f"(target: max < 100 ms)")
    print(f"  peak RSS: this process {_self_peak_mib():.0f} MiB, "
          f"onnxruntime child {child_mem.peak_kib / 1024:.0f} MiB")
    window.close()


def big_part(gib: float, tmp: Path) -> None:
    from opstudio.core.measure.profiler import ProfileSettings, profile_model
    from opstudio.core.model.graph import analyze
    from opstudio.core.model.model_io import load_model

    t0 = time.perf_counter()
    path = big_external_model(tmp, gib)
    size = path.stat().st_size + (tmp / "big.onnx.data").stat().st_size
    make_s = time.perf_counter() - t0
    base = _current_rss_mib()
    t0 = time.perf_counter()
    structure = load_model(path, load_external_data=False)
    info = analyze(structure)
    inspect_s = time.perf_counter() - t0
    after_inspect = _current_rss_mib()
    with DescendantPeak() as child_mem:
        t0 = time.perf_counter()
        prof = profile_model(path, ProfileSettings(runs=5, warmup=1, threads=0,
                                                   timeout_s=1800))
        profile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = load_model(path)
    load_s = time.perf_counter() - t0
    after_load = _current_rss_mib()
    del full
    print(f"\n{size / 2**30:.2f} GiB model with external data ({len(info.nodes)} MatMuls; "
          f"written in {make_s:.1f} s)")
    print(f"  inspect without reading the weights: {inspect_s:.2f} s, "
          f"+{after_inspect - base:.0f} MiB")
    print(f"  profile (5 runs, in the child): {profile_s:.1f} s, median run "
          f"{prof.total_ms['p50']:.1f} ms; child peak RSS {child_mem.peak_kib / 1024:.0f} MiB "
          f"= {child_mem.peak_kib * 1024 / size:.2f}× the model")
    print(f"  full load with weights in this process: {load_s:.1f} s, "
          f"+{after_load - base:.0f} MiB = {(after_load - base) * 2**20 / size:.2f}× the model")
    print(f"  peak RSS of this process overall: {_self_peak_mib():.0f} MiB")


def _self_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--skip-ui", action="store_true")
    p.add_argument("--skip-big", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="opstudio-load-") as tmp:
        if not args.skip_ui:
            ui_part(args.nodes, args.runs, Path(tmp))
        if not args.skip_big:
            big_part(args.gb, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
