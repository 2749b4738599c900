"""Run progress for whoever is watching in this process: the CLI's progress bar."""

from __future__ import annotations

import threading
from collections.abc import Callable

ProgressListener = Callable[[int, int], None]
"""Called with (prompts finished, prompts in the run)."""

_listeners: list[ProgressListener] = []
_lock = threading.Lock()


def subscribe(listener: ProgressListener) -> Callable[[], None]:
    """Listen to run progress; returns the function that stops listening."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            _listeners.remove(listener)

    return unsubscribe


def report(done: int, total: int) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(done, total)
