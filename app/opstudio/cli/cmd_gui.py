"""``opstudio gui [MODEL]``: the desktop app (the welcome page without MODEL).

Scripts (screenshots, packaging smoke tests) can drive it: ``--recipe`` loads a plan,
``--profile`` and ``--compare`` start runs, ``--screenshot`` saves the window once they are done,
and ``--quit-after`` closes the app (at the latest) after that many seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_window_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scripting")
    g.add_argument("--recipe", metavar="FILE.json", help="load this plan after opening the model")
    g.add_argument("--profile", action="store_true", help="profile as soon as the model is open")
    g.add_argument("--compare", action="store_true",
                   help="run Optimize & compare with the plan once the model is open")
    g.add_argument("--runs", type=int, metavar="N", help="timed runs for --profile/--compare")
    g.add_argument("--select", metavar="NAMES",
                   help="comma-separated node names to select once the runs are done")
    g.add_argument("--threads", type=int, metavar="N", help="intra-op threads for the runs")
    g.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE",
                   help="bind a symbolic dim for the runs, e.g. --dim sequence_length=16")
    g.add_argument("--by-layer", action="store_true",
                   help="show the operators grouped by layer (table and graph)")
    g.add_argument("--fold-layers", action="store_true",
                   help="with --by-layer: fold every layer of the graph into one box")
    g.add_argument("--size", metavar="WxH", help="window size, e.g. 1600x1000")
    g.add_argument("--screenshot", metavar="PATH",
                   help="save a picture of the window to PATH once the runs asked for are done")
    g.add_argument("--quit-after", type=float, metavar="SECONDS",
                   help="close the app after the runs and screenshot, or after SECONDS at the "
                        "latest")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gui", help="open the desktop app (the default command)",
                       description="Open the desktop app, optionally on MODEL.")
    p.add_argument("model", nargs="?", help="an .onnx file to open")
    add_window_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return launch(args.model, args)


def launch(model: str | Path | None, args: argparse.Namespace) -> int:
    # Qt is imported here so the rest of the CLI works on machines without a display.
    import dataclasses
    import os
    import sys

    from PySide6.QtCore import QTimer

    from opstudio.core.errors import OpstudioError
    from opstudio.qt.app import create_app
    from opstudio.qt.main_window import MainWindow

    if (sys.platform.startswith("linux") and not os.environ.get("DISPLAY")
            and not os.environ.get("WAYLAND_DISPLAY") and not os.environ.get("QT_QPA_PLATFORM")):
        # Qt would abort the process with a long message; say it in one line instead
        raise OpstudioError("no display to open a window on (DISPLAY is not set); run it in a "
                            "desktop session, under xvfb-run, or with QT_QPA_PLATFORM=offscreen")
    app = create_app()
    window = MainWindow()
    if getattr(args, "size", None):
        w, _, h = args.size.lower().partition("x")
        window.resize(int(w), int(h))
    window.show()
    for name in ("runs", "threads"):
        if getattr(args, name, None) is not None:
            window.set_run_settings(dataclasses.replace(window.run_settings,
                                                        **{name: getattr(args, name)}))
    if getattr(args, "dim", None):
        from opstudio.cli.common import parse_dims

        dims = {**window.run_settings.dims, **parse_dims(args.dim)}
        window.set_run_settings(dataclasses.replace(window.run_settings, dims=dims))
    todo: list[str] = []
    if model is not None and window.open_model(model):
        if getattr(args, "by_layer", False):
            window.table.set_grouped(True)
            if getattr(args, "fold_layers", False):
                window.graph_view.fold_all()
        if getattr(args, "recipe", None):
            try:
                window.panel.load_recipe(args.recipe)
            except OpstudioError as exc:
                window.show_error(str(exc))
        todo = [name for name in ("profile", "compare") if getattr(args, name, False)]
    shot = getattr(args, "screenshot", None)
    quit_after = getattr(args, "quit_after", None)
    state = {"done": False}

    def finish() -> None:
        if state["done"]:
            return
        state["done"] = True
        if shot:
            app.processEvents()
            window.grab().save(str(shot))
        if quit_after is not None:
            window.close()
            app.quit()

    def next_step() -> None:
        while todo:
            step = todo.pop(0)
            worker = window.run_profile() if step == "profile" else window.run_compare()
            if worker is not None:
                worker.signals.finished.connect(lambda: QTimer.singleShot(500, next_step))
                return
        names = [n for n in (getattr(args, "select", None) or "").split(",") if n]
        if names and window.graph is not None:
            found = [window.graph.node(n).index for n in names if window.graph.has_node(n)]
            window.set_selection(found)
            if found:
                window.graph_view.center_on(found[0], zoom_in=False)
        if shot or quit_after is not None:
            QTimer.singleShot(800, finish)

    QTimer.singleShot(300, next_step)
    if quit_after is not None:
        QTimer.singleShot(int(max(quit_after, 0) * 1000), finish)
    return int(app.exec())
