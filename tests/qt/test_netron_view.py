"""Netron's server runs in its own process on 127.0.0.1 and stops with its window."""

from __future__ import annotations

import json
import os
import urllib.request

from opstudio.qt.netron_view import NetronServer, prepare_webengine_environment


def test_server_serves_the_model_locally_and_stops(app, qtbot, mlp_path):
    server = NetronServer(mlp_path)
    try:
        with qtbot.waitSignal(server.ready, timeout=60000) as blocker:
            server.begin()
    finally:
        if server.url is None:
            server.stop()
    url = blocker.args[0]
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
    pid = server.processId()
    server.stop()
    assert server.state() == server.ProcessState.NotRunning
    try:
        os.kill(pid, 0)
        alive = True
    except OSError:
        alive = False
    assert not alive


def test_chromium_flags(monkeypatch):
    monkeypatch.setenv("QTWEBENGINE_CHROMIUM_FLAGS", "--foo")
    prepare_webengine_environment()
    flags = os.environ["QTWEBENGINE_CHROMIUM_FLAGS"].split()
    assert flags[0] == "--foo" and "--disable-gpu" in flags
    assert ("--no-sandbox" in flags) == (os.geteuid() == 0)


def test_only_requests_to_this_machine_are_allowed():
    from PySide6.QtCore import QUrl

    from opstudio.qt.netron_view import is_local_request

    for url in ("http://127.0.0.1:8080/", "http://localhost:1234/model.onnx",
                "ws://127.0.0.1:9/", "data:text/plain,hi", "blob:http://127.0.0.1/x",
                "about:blank"):
        assert is_local_request(QUrl(url)), url
    for url in ("https://ipinfo.io/json", "https://www.google-analytics.com/g/collect",
                "http://10.0.0.5/", "http://127.0.0.1.evil.com/", "file:///etc/passwd",
                "https://127.0.0.1/", "ftp://localhost/"):
        assert not is_local_request(QUrl(url)), url


def test_embedded_page_opens_on_the_graph_without_leaving_the_machine(app, qtbot, mlp_path):
    import pytest

    from opstudio.qt.netron_view import NetronWindow, webengine_available

    if not webengine_available() or os.environ.get("OPSTUDIO_SKIP_WEBENGINE"):
        pytest.skip("QtWebEngine is not available")
    window = NetronWindow(mlp_path)
    qtbot.addWidget(window)
    window.show()
    try:
        qtbot.waitUntil(lambda: window.web is not None or window.server.url == "", timeout=60000)
        if window.web is None:
            pytest.skip(f"netron did not start: {window.status.text()}")
        with qtbot.waitSignal(window.web.loadFinished, timeout=60000) as loaded:
            pass
        if not loaded.args[0]:
            pytest.skip("QtWebEngine could not render here (missing system libraries)")

        def page_state() -> dict:
            result: list = []
            window.web.page().runJavaScript(
                "JSON.stringify({graph: document.querySelectorAll('#canvas .node').length, "
                "message: (document.getElementById('message-text') || {}).innerText || ''})",
                0, result.append)
            qtbot.waitUntil(lambda: bool(result), timeout=10000)
            return json.loads(result[0]) if result[0] else {}

        state: dict = {}

        def graph_shown() -> bool:
            state.clear()
            state.update(page_state())
            return state.get("graph", 0) > 0

        qtbot.waitUntil(graph_shown, timeout=60000)
        assert "cookies" not in state.get("message", "")
        # what the page tried to reach elsewhere (its analytics) was refused, nothing local was
        assert all(not u.startswith(("http://127.0.0.1", "http://localhost"))
                   for u in window.interceptor.blocked)
    finally:
        window.close()
