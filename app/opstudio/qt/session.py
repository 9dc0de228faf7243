"""What the app remembers across restarts, in QSettings.

Recent files, window geometry and dock state, the last model, the plan (saved on every edit, so a
crash or a kill loses nothing), the run settings and where the advisor's scan runs. Values are stored as JSON text so that they
read back the same on every platform's settings backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, QSettings

MAX_RECENT = 10


class Session:
    def __init__(self, settings: QSettings | None = None) -> None:
        self.qs = settings or QSettings("opstudio", "opstudio")

    # --- recent files -------------------------------------------------------------------------
    def recent_files(self) -> list[str]:
        items = self._json("recent_files", [])
        return [p for p in items if isinstance(p, str)] if isinstance(items, list) else []

    def add_recent(self, path: str | Path) -> list[str]:
        p = str(Path(path).resolve())
        items = [p] + [x for x in self.recent_files() if x != p]
        self._set_json("recent_files", items[:MAX_RECENT])
        return items[:MAX_RECENT]

    def clear_recent(self) -> None:
        self._set_json("recent_files", [])

    # --- last session -------------------------------------------------------------------------
    def last_model(self) -> str | None:
        v = self.qs.value("last_model", "")
        return str(v) if v else None

    def set_last_model(self, path: str | Path | None) -> None:
        self.qs.setValue("last_model", str(path) if path else "")

    def plan_json(self, model_path: str | Path | None = None) -> dict[str, Any] | None:
        """The autosaved plan, if it belongs to ``model_path`` (or any model when None)."""
        data = self._json("plan", None)
        if not isinstance(data, dict):
            return None
        if model_path is not None and data.get("model") != str(model_path):
            return None
        recipe = data.get("recipe")
        return recipe if isinstance(recipe, dict) else None

    def save_plan(self, model_path: str | Path | None, recipe_json: dict[str, Any]) -> None:
        self._set_json("plan", {"model": str(model_path or ""), "recipe": recipe_json})
        self.qs.sync()  # autosave: on disk now, not at exit

    def run_settings(self) -> dict[str, Any]:
        data = self._json("run_settings", {})
        return data if isinstance(data, dict) else {}

    def save_run_settings(self, data: dict[str, Any]) -> None:
        self._set_json("run_settings", data)

    def scan_cluster(self) -> str:
        """The advisor's "Run scan on", as typed ("" for this machine)."""
        return str(self.qs.value("advisor/cluster", "") or "")

    def save_scan_cluster(self, text: str) -> None:
        self.qs.setValue("advisor/cluster", text)

    # --- window -------------------------------------------------------------------------------
    def save_window(self, geometry: QByteArray, state: QByteArray) -> None:
        self.qs.setValue("window/geometry", geometry)
        self.qs.setValue("window/state", state)

    def window_geometry(self) -> QByteArray | None:
        v = self.qs.value("window/geometry")
        return v if isinstance(v, QByteArray) and not v.isEmpty() else None

    def window_state(self) -> QByteArray | None:
        v = self.qs.value("window/state")
        return v if isinstance(v, QByteArray) and not v.isEmpty() else None

    def sync(self) -> None:
        self.qs.sync()

    def _json(self, key: str, default: Any) -> Any:
        raw = self.qs.value(key, "")
        if not raw:
            return default
        try:
            return json.loads(str(raw))
        except ValueError:
            return default

    def _set_json(self, key: str, value: Any) -> None:
        self.qs.setValue(key, json.dumps(value, default=str))
