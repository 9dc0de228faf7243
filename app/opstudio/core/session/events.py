"""A small, typed observer: the core's state objects announce changes without knowing who
listens, so the document model stays free of Qt and the views subscribe to it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, ParamSpec

P = ParamSpec("P")


class Event(Generic[P]):
    """Listeners called in the order they connected, in the thread that emits.

    The app emits only from its UI thread (worker results arrive there as Qt signals), so the
    views may touch widgets in their listeners."""

    def __init__(self) -> None:
        self._listeners: list[Callable[P, None]] = []

    def connect(self, listener: Callable[P, None]) -> Callable[P, None]:
        self._listeners.append(listener)
        return listener

    def disconnect(self, listener: Callable[P, None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def emit(self, *args: P.args, **kwargs: P.kwargs) -> None:
        # a copy: a listener may disconnect itself (or connect another) while being called
        for listener in list(self._listeners):
            listener(*args, **kwargs)
