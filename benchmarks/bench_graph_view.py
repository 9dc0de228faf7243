"""Graph view speed on generated LLM-like graphs of 1k, 10k and 50k nodes (offscreen).

Reports layout time, time to first paint (set_graph + layout + first full repaint) and the
frame time of pans and zooms at three zoom levels (whole graph, mid, close with labels).

    python benchmarks/bench_graph_view.py [--sizes 1000 10000 50000] [--frames 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
from PySide6.QtWidgets import QApplication

from opstudio.core.model.graph import GraphInfo, NodeInfo
from opstudio.core.model.layout import compute_layout
from opstudio.qt.app import create_app
from opstudio.qt.graph_view import GraphView

BLOCK = [  # (op type, inputs as offsets back from this node within the block, or "res")
    ("LayerNormalization", ["res"]), ("MatMul", [1]), ("MatMul", [2]), ("MatMul", [3]),
    ("Reshape", [3]), ("Reshape", [3]), ("Reshape", [3]), ("Transpose", [3]),
    ("Transpose", [3]), ("Transpose", [3]), ("MatMul", [3, 2]), ("Mul", [1]),
    ("Add", [1, "mask"]), ("Softmax", [1]), ("MatMul", [1, 5]), ("Transpose", [1]),
    ("Reshape", [1]), ("MatMul", [1]), ("Add", [1, "res"]), ("LayerNormalization", [1]),
    ("MatMul", [1]), ("Gelu", [1]), ("MatMul", [1]), ("Add", [1, 5]),
]


def llm_like_graph(n: int) -> GraphInfo:
    """Transformer blocks stacked until ``n`` nodes, with a mask shared by every block."""
    nodes: list[NodeInfo] = []
    edges: list[tuple[int, int, str]] = []
    nodes.append(NodeInfo(0, "mask", "Where", "", [], ["t0"], [[1, 1, 128, 128]]))
    residual = 0
    while len(nodes) < n:
        start = len(nodes)
        for k, (op, ins) in enumerate(BLOCK):
            i = len(nodes)
            if i >= n:
                break
            srcs = []
            for s in ins:
                j = residual if s == "res" else 0 if s == "mask" else i - s
                if 0 <= j < i:
                    srcs.append(j)
            name = f"/model/layers.{start // len(BLOCK)}/{op.lower()}_{k}"
            nodes.append(NodeInfo(i, name, op, "", [f"t{j}" for j in srcs], [f"t{i}"],
                                  [[1, 128, 768]]))
            edges += [(j, i, f"t{j}") for j in sorted(set(srcs))]
        residual = len(nodes) - 1
    return GraphInfo(nodes=nodes, edges=edges, inputs=[], outputs=[], tensors={}, opset=17,
                     ir_version=8, producer="bench")


def frame_ms(app: QApplication, view: GraphView, action) -> float:
    action()
    t = time.perf_counter()
    view.viewport().repaint()
    app.processEvents()
    return (time.perf_counter() - t) * 1000


def bench(app: QApplication, n: int, frames: int) -> dict[str, float]:
    graph = llm_like_graph(n)
    view = GraphView()
    view.resize(1600, 1000)
    view.show()
    app.processEvents()
    t0 = time.perf_counter()
    layout = compute_layout(graph)
    t_layout = time.perf_counter() - t0
    view.set_graph(graph, layout)
    view.viewport().repaint()
    app.processEvents()
    t_first = time.perf_counter() - t0
    out = {"nodes": n, "edges": len(graph.edges), "layout_s": t_layout, "first_paint_s": t_first}
    sb = view.verticalScrollBar()
    rng = np.random.default_rng(0)
    for label, setup in (("whole", view.fit_all),
                         ("mid", lambda: (view._set_scale(0.25), view.center_on(n // 2, False))),
                         ("close", lambda: (view._set_scale(1.0), view.center_on(n // 2, False)))):
        setup()
        app.processEvents()
        pans = [frame_ms(app, view, lambda: sb.setValue(sb.value() + int(rng.integers(-60, 60))))
                for _ in range(frames)]
        zooms = [frame_ms(app, view, lambda k=k: view.zoom(1.1 if k % 2 else 1 / 1.1))
                 for k in range(frames)]
        out[f"pan_{label}_ms"] = statistics.median(pans)
        out[f"pan_{label}_max_ms"] = max(pans)
        out[f"zoom_{label}_ms"] = statistics.median(zooms)
        out[f"zoom_{label}_max_ms"] = max(zooms)
    view.close()
    view.deleteLater()
    app.processEvents()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--frames", type=int, default=20)
    args = parser.parse_args()
    app = create_app()
    rows = [bench(app, n, args.frames) for n in args.sizes]
    print(f"platform: {app.platformName()}, viewport 1600x1000, median (max) over "
          f"{args.frames} frames")
    head = ("nodes", "edges", "layout s", "first paint s", "pan whole ms", "zoom whole ms",
            "pan mid ms", "zoom mid ms", "pan close ms", "zoom close ms")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        cells = [str(r["nodes"]), str(r["edges"]), f"{r['layout_s']:.3f}",
                 f"{r['first_paint_s']:.3f}"]
        for lvl in ("whole", "mid", "close"):
            for kind in ("pan", "zoom"):
                cells.append(f"{r[f'{kind}_{lvl}_ms']:.1f} ({r[f'{kind}_{lvl}_max_ms']:.0f})")
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
