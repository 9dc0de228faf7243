"""Netron's server runs in its own process on 127.0.0.1 and stops with its window."""

from __future__ import annotations

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
