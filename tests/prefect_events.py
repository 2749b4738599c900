"""Read a flow run's events back from Prefect's events API, as an automation sees them."""

from __future__ import annotations

import time
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings import PREFECT_API_URL


def events_of(
    name: str,
    flow_run_id: object,
    api_url: str | None = None,
    *,
    at_least: int = 1,
    settle: float = 1.0,
) -> list[dict[str, Any]]:
    """The events named `name` whose related resources include the flow run. Events are
    written in the background: wait for `at_least` of them, then `settle` seconds for any
    more (a test of "once" reads them all)."""
    url = f"{api_url or PREFECT_API_URL.value()}/events/filter"
    body = {
        "filter": {
            "event": {"name": [name]},
            "related": {"resources_in_roles": [[f"prefect.flow-run.{flow_run_id}", "flow-run"]]},
            "occurred": {"since": "2000-01-01T00:00:00Z"},
        },
        "limit": 50,
    }
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(httpx.post(url, json=body, timeout=10).json()["events"]) >= at_least:
            time.sleep(settle)
            break
        time.sleep(0.3)
    return list(httpx.post(url, json=body, timeout=10).json()["events"])


def flow_runs_named(name: str) -> list[FlowRun]:
    """The flow runs called `name` on the test harness's server."""
    named = FlowRunFilter(name=FlowRunFilterName(any_=[name]))
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=named)


def flow_run_id_named(name: str) -> object:
    """The id of the flow run called `name` on the test harness's server."""
    runs = flow_runs_named(name)
    assert len(runs) == 1, name
    return runs[0].id


def paused_flow_runs() -> list[FlowRun]:
    """The flow runs paused or suspended on the test harness's server."""
    paused = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
    )
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=paused)
