"""GUI tests run offscreen, with settings in a temp file so the user's are never touched."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from pathlib import Path

import onnx
import pytest
from PySide6.QtCore import QCoreApplication, Qt
from qt_models import mlp_model

from opstudio.qt.netron_view import prepare_webengine_environment

# as the app does before its QApplication exists: QtWebEngine (the Netron view) needs both
prepare_webengine_environment()
QCoreApplication.setAttribute(Qt.ApplicationAttribute.AA_ShareOpenGLContexts, True)


@pytest.fixture(autouse=True, scope="session")
def _private_settings(tmp_path_factory):
    """Even code that opens the default QSettings writes to a temp folder, never the user's."""
    from PySide6.QtCore import QSettings

    folder = str(tmp_path_factory.mktemp("qsettings"))
    for fmt in (QSettings.Format.NativeFormat, QSettings.Format.IniFormat):
        QSettings.setPath(fmt, QSettings.Scope.UserScope, folder)
        QSettings.setPath(fmt, QSettings.Scope.SystemScope, folder)
    return folder


@pytest.fixture
def app(qapp):
    from opstudio.qt.app import create_app

    return create_app()


@pytest.fixture
def settings(tmp_path):
    from PySide6.QtCore import QSettings

    return QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)


@pytest.fixture
def mlp_path(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), path)
    return path


def shown_window(qtbot, settings, run_settings=None):
    """A main window on screen (``run_settings`` None: the app's own defaults); closed, its
    work cancelled, when the generator resumes."""
    from opstudio.qt.main_window import MainWindow

    w = MainWindow(settings)
    if run_settings is not None:
        w.set_run_settings(run_settings)
    qtbot.addWidget(w)
    w.resize(1400, 900)
    w.show()
    qtbot.waitExposed(w)
    yield w
    if w.worker is not None and not w.worker.is_done():
        w.worker.cancel()
        qtbot.waitUntil(w.worker.is_done, timeout=15000)
    w.close()


@pytest.fixture
def window(app, qtbot, settings):
    from opstudio.core.measure.profiler import ProfileSettings

    yield from shown_window(qtbot, settings,
                            ProfileSettings(runs=3, warmup=1, threads=1, dims={"batch": 2}))
