"""QApplication setup: attributes that must precede it, the light theme, the icon."""

from __future__ import annotations

import sys

import pyqtgraph as pg
from pyqtgraph.util.garbage_collector import GarbageCollector
from PySide6.QtCore import QCoreApplication, QRectF, Qt
from PySide6.QtGui import QColor, QFont, QIcon, QPainter, QPalette, QPixmap
from PySide6.QtWidgets import QApplication

from opstudio import __version__
from opstudio.qt.netron_view import prepare_webengine_environment

ACCENT = "#1f6fd1"

STYLE = f"""
QMainWindow, QDialog {{ background: #f6f7f9; }}
QDockWidget {{ font-weight: 600; color: #2a3240; }}
QDockWidget::title {{ background: #eceff3; padding: 5px 8px; border-bottom: 1px solid #d9dee5; }}
QToolBar {{ background: #ffffff; border-bottom: 1px solid #dde2e8; spacing: 6px; padding: 4px; }}
QToolBar QToolButton {{ padding: 4px 9px; border-radius: 5px; color: #1d2430; }}
QToolBar QToolButton:hover {{ background: #e8eef7; }}
QToolBar QToolButton:disabled {{ color: #a0a8b4; }}
QPushButton {{ padding: 5px 12px; border: 1px solid #c9d0da; border-radius: 5px;
               background: #ffffff; color: #1d2430; }}
QPushButton:hover {{ background: #eef3fa; }}
QPushButton:disabled {{ color: #a0a8b4; background: #f3f4f6; }}
QPushButton#primary {{ background: {ACCENT}; color: white; border: 1px solid {ACCENT};
                       font-weight: 600; }}
QPushButton#primary:hover {{ background: #1a5fb5; }}
QPushButton#primary:disabled {{ background: #a9c3e6; border-color: #a9c3e6; }}
QPushButton#demoButton {{ text-align: left; padding: 8px 12px; }}
QGroupBox {{ font-weight: 600; color: #2a3240; border: 1px solid #dde2e8; border-radius: 6px;
             margin-top: 14px; padding: 8px 6px 6px 6px; background: #ffffff; }}
QGroupBox::title {{ subcontrol-origin: margin; left: 8px; padding: 0 4px; }}
QLabel#reason {{ color: #8a5a00; font-size: 11px; }}
QLabel#error {{ color: #b3261e; }}
QLabel#hint {{ color: #6b7483; }}
QLabel#sectionLabel {{ font-weight: 600; color: #2a3240; padding: 4px 0; }}
QLabel#summary {{ font-size: 14px; color: #1d2430; padding: 4px 2px; }}
QLabel#welcomeTitle {{ font-size: 30px; font-weight: 700; color: #1d2430; }}
QLabel#welcomeSubtitle {{ font-size: 14px; color: #4a5363; }}
QFrame#card {{ background: #ffffff; border: 1px solid #dde2e8; border-radius: 8px; }}
QFrame#banner {{ background: #fdecea; border: 1px solid #f3b8b2; border-radius: 5px; }}
QTableView {{ gridline-color: #edf0f3; background: #ffffff; alternate-background-color: #f8f9fb;
              selection-background-color: #d6e6fa; selection-color: #1d2430; }}
QHeaderView::section {{ background: #f1f3f6; border: none; border-right: 1px solid #e1e5ea;
                        border-bottom: 1px solid #d9dee5; padding: 4px 6px; color: #2a3240; }}
QListWidget {{ background: #ffffff; border: 1px solid #dde2e8; border-radius: 5px;
               alternate-background-color: #f8f9fb; }}
QLineEdit, QSpinBox, QDoubleSpinBox, QComboBox {{ padding: 3px 6px; border: 1px solid #c9d0da;
               border-radius: 4px; background: white; }}
QTabWidget::pane {{ border: none; }}
QTabBar::tab {{ padding: 6px 14px; color: #4a5363; }}
QTabBar::tab:selected {{ color: {ACCENT}; border-bottom: 2px solid {ACCENT}; }}
QStatusBar {{ background: #ffffff; border-top: 1px solid #dde2e8; }}
QProgressBar {{ border: 1px solid #c9d0da; border-radius: 4px; background: #ffffff;
                text-align: center; max-height: 16px; }}
QProgressBar::chunk {{ background: {ACCENT}; border-radius: 3px; }}
"""


def app_icon() -> QIcon:
    """A small drawn icon (no image files to ship): three stacked operator boxes."""
    pm = QPixmap(64, 64)
    pm.fill(Qt.GlobalColor.transparent)
    p = QPainter(pm)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    p.setPen(Qt.PenStyle.NoPen)
    for i, colour in enumerate(("#9aa8bb", "#fd9d46", ACCENT)):
        p.setBrush(QColor(colour))
        p.drawRoundedRect(QRectF(10 + i * 4, 6 + i * 19, 44 - i * 8, 14), 4, 4)
    p.end()
    return QIcon(pm)


def create_app(argv: list[str] | None = None) -> QApplication:
    """The QApplication (created once); safe to call when one exists (tests)."""
    existing = QApplication.instance()
    if existing is not None:
        _configure(existing)  # type: ignore[arg-type]
        return existing  # type: ignore[return-value]
    prepare_webengine_environment()
    # QtWebEngine needs shared GL contexts decided before the application object exists.
    QCoreApplication.setAttribute(Qt.ApplicationAttribute.AA_ShareOpenGLContexts, True)
    app = QApplication(argv if argv is not None else sys.argv[:1])
    _configure(app)
    return app


_GARBAGE_COLLECTOR: GarbageCollector | None = None


def _configure(app: QApplication) -> None:
    # Once per application: a style sheet set again re-polishes every live widget, and doing
    # that while a worker thread emits its last signal has deadlocked (seen in the tests,
    # where each test asks for the application again).
    if app.property("opstudio_configured"):
        return
    app.setProperty("opstudio_configured", True)
    # Python's cyclic garbage collector runs in whichever thread allocates when its threshold
    # is reached. Run in a worker thread, it destroyed a QMenu left in a reference cycle there
    # and deadlocked against the UI thread (seen in the tests: the QMenu's destructor waited
    # for the GIL while holding a Qt lock the UI thread wanted). pyqtgraph's collector turns
    # automatic collection off and collects on a UI-thread timer instead.
    global _GARBAGE_COLLECTOR
    _GARBAGE_COLLECTOR = GarbageCollector(interval=1.0)
    app.setApplicationName("opstudio")
    app.setOrganizationName("opstudio")
    app.setApplicationVersion(__version__)
    app.setWindowIcon(app_icon())
    app.setStyle("Fusion")
    pal = app.palette()
    pal.setColor(QPalette.ColorRole.Window, QColor("#f6f7f9"))
    pal.setColor(QPalette.ColorRole.Base, QColor("#ffffff"))
    pal.setColor(QPalette.ColorRole.AlternateBase, QColor("#f8f9fb"))
    pal.setColor(QPalette.ColorRole.Text, QColor("#1d2430"))
    pal.setColor(QPalette.ColorRole.WindowText, QColor("#1d2430"))
    pal.setColor(QPalette.ColorRole.Button, QColor("#ffffff"))
    pal.setColor(QPalette.ColorRole.ButtonText, QColor("#1d2430"))
    pal.setColor(QPalette.ColorRole.Highlight, QColor(ACCENT))
    pal.setColor(QPalette.ColorRole.ToolTipBase, QColor("#ffffff"))
    pal.setColor(QPalette.ColorRole.ToolTipText, QColor("#1d2430"))
    disabled = QPalette.ColorGroup.Disabled
    for role in (QPalette.ColorRole.WindowText, QPalette.ColorRole.Text,
                 QPalette.ColorRole.ButtonText):
        pal.setColor(disabled, role, QColor("#9aa3ad"))
    pal.setColor(disabled, QPalette.ColorRole.Base, QColor("#f3f4f6"))
    app.setPalette(pal)
    font = QFont(app.font())
    if font.pointSizeF() < 9.5:
        font.setPointSizeF(9.5)
    app.setFont(font)
    app.setStyleSheet(STYLE)
    pg.setConfigOptions(background="w", foreground="#2a3240", antialias=True)
