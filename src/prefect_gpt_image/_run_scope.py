"""State that lives as long as one flow run, in one process: the routes a run dropped,
the money it may still spend.

Tasks find it through the flow run they belong to, so that a task called alone and a
task of a run both know where they stand, without an argument to carry it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from prefect.context import FlowRunContext, TaskRunContext

T = TypeVar("T")

RUNS_KEPT = 64
"""Past flow runs whose state a long-lived process keeps."""


def current_run_id() -> str | None:
    """The flow run of the current task or flow (a task run alone stands for itself)."""
    task_context = TaskRunContext.get()
    if task_context is not None and task_context.task_run.flow_run_id is not None:
        return str(task_context.task_run.flow_run_id)
    flow_context = FlowRunContext.get()
    if flow_context is not None and flow_context.flow_run is not None:
        return str(flow_context.flow_run.id)
    return str(task_context.task_run.id) if task_context is not None else None


class RunScoped(Generic[T]):
    """One `T` per flow run, made on first use by `factory`."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._values: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_id: str | None = None) -> T:
        run_id = run_id or current_run_id()
        if run_id is None:
            return self._factory()
        with self._lock:
            value = self._values.get(run_id)
            if value is None:
                value = self._values[run_id] = self._factory()
                while len(self._values) > RUNS_KEPT:
                    self._values.popitem(last=False)
            return value
