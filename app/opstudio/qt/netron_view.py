"""Netron inside the app: one server process per model, shown in a QWebEngineView.

netron keeps the served model in a class attribute, so two models need two processes. The child
binds to 127.0.0.1 on a free port, prints the port, and lives until its stdin closes — which
also happens when the app dies without cleaning up. Without QtWebEngine the page opens in the
system browser instead, and the window says so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QProcess, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

if TYPE_CHECKING:  # QtWebEngine is optional: imported where it is used
    from PySide6.QtWebEngineWidgets import QWebEngineView

SERVER_SCRIPT = r"""
import logging, sys
logging.basicConfig(level=logging.WARNING)
import netron
host, port = netron.serve(sys.argv[1], address=("127.0.0.1", 0), browse=False)
print(f"PORT {port}", flush=True)
sys.stdin.read()  # returns when the app closes the pipe or exits
netron.stop()
"""
START_TIMEOUT_MS = 20000


def webengine_available() -> bool:
    try:
        from PySide6 import QtWebEngineWidgets  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_webengine_environment() -> None:
    """Chromium refuses to run as root without --no-sandbox; GPU is off for VMs and Xvfb."""
    flags = os.environ.get("QTWEBENGINE_CHROMIUM_FLAGS", "")
    wanted = ["--disable-gpu"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        wanted.insert(0, "--no-sandbox")
    for f in wanted:
        if f not in flags.split():
            flags = f"{flags} {f}".strip()
    os.environ["QTWEBENGINE_CHROMIUM_FLAGS"] = flags


class NetronServer(QProcess):
    """``netron.serve`` in a child process; ``ready(url)`` once it listens, ``failed(msg)``."""

    ready = Signal(str)
    failed = Signal(str)

    def __init__(self, model_path: str | Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model_path = str(model_path)
        self.url: str | None = None
        self._buffer = b""
        self.readyReadStandardOutput.connect(self._on_output)
        self.errorOccurred.connect(self._on_error)
        self.finished.connect(self._on_finished)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(lambda: self._fail("netron did not start within 20 s"))

    def begin(self) -> None:
        self.setProcessChannelMode(QProcess.ProcessChannelMode.SeparateChannels)
        self.start(sys.executable, ["-c", SERVER_SCRIPT, self.model_path])
        self._timer.start(START_TIMEOUT_MS)

    def stop(self) -> None:
        self._timer.stop()
        if self.state() != QProcess.ProcessState.NotRunning:
            self.closeWriteChannel()  # the child's stdin.read() returns and it exits
            if not self.waitForFinished(1500):
                self.kill()
                self.waitForFinished(1000)

    def _on_output(self) -> None:
        self._buffer += bytes(self.readAllStandardOutput().data())
        for line in self._buffer.decode("utf-8", "replace").splitlines():
            if line.startswith("PORT ") and self.url is None:
                self._timer.stop()
                self.url = f"http://127.0.0.1:{int(line.split()[1])}/"
                self.ready.emit(self.url)

    def _on_error(self, _error: QProcess.ProcessError) -> None:
        self._fail(f"netron: {self.errorString()}")

    def _on_finished(self, code: int, _status: QProcess.ExitStatus) -> None:
        if self.url is None:
            err = bytes(self.readAllStandardError().data()).decode("utf-8", "replace").strip()
            last = err.splitlines()[-1] if err else f"exit code {code}"
            self._fail(f"netron stopped: {last}")

    def _fail(self, message: str) -> None:
        self._timer.stop()
        if self.url is None:
            self.url = ""
            self.failed.emit(message)


# Schemes a page uses for what it holds itself; anything fetched from elsewhere is refused.
_INNER_SCHEMES = {"data", "blob", "about", "qrc"}
_LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def is_local_request(url: QUrl) -> bool:
    """Whether the embedded page may load ``url``: its own 127.0.0.1 server, never the network.

    Netron's page asks ipinfo.io where the user is and reports usage to Google Analytics once
    consent is given; a tool that promises to keep models local lets neither through."""
    scheme = url.scheme().lower()
    if scheme in _INNER_SCHEMES:
        return True
    return scheme in ("http", "ws") and url.host().lower() in _LOCAL_HOSTS


def _local_only_profile(parent: QWidget):
    """An off-the-record web profile that refuses every request off this machine and already
    holds Netron's consent cookie, so the page opens on the graph, not on a cookie banner."""
    from PySide6.QtWebEngineCore import QWebEngineProfile, QWebEngineUrlRequestInterceptor

    class LocalOnly(QWebEngineUrlRequestInterceptor):
        def __init__(self, owner: QWidget) -> None:
            super().__init__(owner)
            self.blocked: list[str] = []

        def interceptRequest(self, info) -> None:
            url = info.requestUrl()
            if not is_local_request(url):
                self.blocked.append(url.toString())
                info.block(True)

    profile = QWebEngineProfile(parent)  # no storage name: off the record, nothing on disk
    interceptor = LocalOnly(parent)
    profile.setUrlRequestInterceptor(interceptor)
    return profile, interceptor


def _consent_cookie(profile, url: str) -> None:
    import time

    from PySide6.QtNetwork import QNetworkCookie

    cookie = QNetworkCookie(b"consent", str(int(time.time() * 1000)).encode())
    cookie.setPath("/")
    profile.cookieStore().setCookie(cookie, QUrl(url))


class NetronWindow(QWidget):
    """A top-level window showing one model in Netron; closing it stops the server."""

    closed = Signal(object)

    def __init__(self, model_path: str | Path, title: str = "",
                 parent: QWidget | None = None) -> None:
        super().__init__(parent, Qt.WindowType.Window)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        self.setWindowTitle(f"{title or Path(model_path).name} — Netron — opstudio")
        self.resize(1100, 800)
        self.status = QLabel(f"Starting Netron for {Path(model_path).name}…")
        self.status.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.status.setWordWrap(True)
        self.web: QWebEngineView | None = None
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._layout.addWidget(self.status)
        self.server = NetronServer(model_path, self)
        self.server.ready.connect(self._on_ready)
        self.server.failed.connect(self._on_failed)
        self.server.begin()

    def _on_ready(self, url: str) -> None:
        if webengine_available():
            from PySide6.QtWebEngineCore import QWebEnginePage
            from PySide6.QtWebEngineWidgets import QWebEngineView

            web = self.web = QWebEngineView(self)
            self.profile, self.interceptor = _local_only_profile(self)  # outlives the page
            _consent_cookie(self.profile, url)
            web.setPage(QWebEnginePage(self.profile, web))
            web.setUrl(QUrl(url))
            self.status.hide()
            self._layout.addWidget(web)
        else:
            QDesktopServices.openUrl(QUrl(url))
            self.status.setText(f"QtWebEngine is not installed, so Netron opened in your web "
                                f"browser at {url}\nClose this window to stop the server.")

    def _on_failed(self, message: str) -> None:
        self.status.setText(message)

    def closeEvent(self, event) -> None:
        self.server.stop()
        if self.web is not None:
            self.web.setUrl(QUrl("about:blank"))
        self.closed.emit(self)
        super().closeEvent(event)
