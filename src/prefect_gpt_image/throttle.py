"""Holding requests back while the API has asked us to wait."""

from __future__ import annotations

import threading
import time

from prefect_gpt_image.retry_policy import MAX_SERVER_WAIT_SECONDS


class EndpointGate:
    """Every request to one endpoint passes this gate.

    A 429 or 503 with Retry-After (or the gateway's reset header) speaks for the
    key, not for one request, so the gate holds back all requests until then.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._not_before = 0.0

    def hold(self, seconds: float) -> None:
        """Let no request through for `seconds` (capped), counted from now."""
        until = time.monotonic() + min(max(seconds, 0.0), MAX_SERVER_WAIT_SECONDS)
        with self._lock:
            self._not_before = max(self._not_before, until)

    def wait(self) -> float:
        """Block until requests may go; returns the seconds waited."""
        waited = 0.0
        while (delay := self._not_before - time.monotonic()) > 0:
            time.sleep(delay)
            waited += delay
        return waited


_gates: dict[str, EndpointGate] = {}
_gates_lock = threading.Lock()


def gate_for(endpoint_url: str) -> EndpointGate:
    """The process-wide gate of one endpoint."""
    with _gates_lock:
        return _gates.setdefault(endpoint_url, EndpointGate())
