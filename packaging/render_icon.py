"""Render resources/icons/opstudio.svg to the 256×256 PNG the desktop entry uses.

    python packaging/render_icon.py            # rewrites resources/icons/opstudio.png
    python packaging/render_icon.py --size 32 --out /tmp/icon32.png

Runs offscreen (no display needed); uses Qt's SVG renderer, so the PNG matches what Qt shows.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ICONS = Path(__file__).resolve().parents[1] / "resources" / "icons"


def render(svg: Path, out: Path, size: int) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    _app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise SystemExit(f"error: {svg} is not a valid SVG")
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    if not image.save(str(out), "PNG"):
        raise SystemExit(f"error: could not write {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--svg", type=Path, default=ICONS / "opstudio.svg")
    parser.add_argument("--out", type=Path, default=ICONS / "opstudio.png")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    render(args.svg, args.out, args.size)
    print(f"{args.out} ({args.size}×{args.size})")


if __name__ == "__main__":
    main()
