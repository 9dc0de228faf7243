"""The plan being built in the app: recipe steps with undo and redo, free of Qt.

Every edit replaces the whole list of steps (plans are short), so undoing one is putting the
previous list back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from opstudio.core.model.graph import GraphInfo
from opstudio.core.plan.recipe import Recipe, Step
from opstudio.core.session.events import Event


@dataclass(frozen=True)
class _Edit:
    text: str
    before: tuple[Step, ...]
    after: tuple[Step, ...]


class Plan:
    """The list of steps; ``changed`` fires after every edit (undo and redo included) and
    ``history_changed`` when what Undo or Redo would do has changed."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self._done: list[_Edit] = []
        self._undone: list[_Edit] = []
        self.changed: Event[[]] = Event()
        self.history_changed: Event[[]] = Event()

    def recipe(self) -> Recipe:
        return Recipe(list(self.steps))

    # --- edits --------------------------------------------------------------------------------
    def add(self, step: Step) -> None:
        self._push([*self.steps, step], f"add {step.technique}")

    def remove(self, index: int) -> None:
        self._push([s for i, s in enumerate(self.steps) if i != index], "remove step")

    def replace(self, steps: Sequence[Step], text: str = "load plan") -> None:
        self._push(list(steps), text)

    def _push(self, steps: list[Step], text: str) -> None:
        self._done.append(_Edit(text, tuple(self.steps), tuple(steps)))
        self._undone.clear()
        self._set(steps)

    # --- history ------------------------------------------------------------------------------
    def can_undo(self) -> bool:
        return bool(self._done)

    def can_redo(self) -> bool:
        return bool(self._undone)

    def undo_text(self) -> str:
        return self._done[-1].text if self._done else ""

    def redo_text(self) -> str:
        return self._undone[-1].text if self._undone else ""

    def undo(self) -> None:
        if self._done:
            edit = self._done.pop()
            self._undone.append(edit)
            self._set(list(edit.before))

    def redo(self) -> None:
        if self._undone:
            edit = self._undone.pop()
            self._done.append(edit)
            self._set(list(edit.after))

    def clear_history(self) -> None:
        """Forget past edits (a restored plan is where Undo starts, not a step to undo)."""
        self._done.clear()
        self._undone.clear()
        self.history_changed.emit()

    def _set(self, steps: list[Step]) -> None:
        self.steps = steps
        self.changed.emit()
        self.history_changed.emit()

    # --- views --------------------------------------------------------------------------------
    def techniques_by_node(self, graph: GraphInfo | None) -> dict[str, str]:
        """Node name -> techniques planned for it (the table's "technique" column)."""
        out: dict[str, list[str]] = {}
        for step in self.steps:
            names = list(step.nodes or [])
            if step.is_selector and graph is not None:
                names += [n.name for n in graph.nodes if step.selects(n.op_type, [n.name])]
            for name in names:
                out.setdefault(name, [])
                if step.technique not in out[name]:
                    out[name].append(step.technique)
        return {k: ", ".join(v) for k, v in out.items()}
