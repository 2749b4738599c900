"""What the emulator remembers of the calls it answered: `RecordedCall`, and the records that
`calls`, `batch_calls` and `peak_concurrency` read.

Both routes and the batches record here. A reset starts a new epoch, so that a call still in
flight across it is dropped rather than recorded into the next test; calls are kept in order
of arrival, not of answer.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

_SECRET_HEADERS = frozenset({"x-rapidapi-key", "authorization", "api-key"})
"""Headers whose values are redacted in call records."""


@dataclass(frozen=True)
class RecordedCall:
    """One POST to a generation or edit endpoint, as received and as answered.

    `headers` has the key redacted. `path` tells the routes apart, edits from generations; `n`
    is the images asked for (always 1 on RapidAPI's route); `usage` is the token usage of an
    OpenAI-route answer 200. An edit's `body` holds its text fields; its files are recorded as
    hex SHA-256 digests, `inputs` in the order sent and `mask`, so a test can tell which bytes
    were edited; `input_fidelity` is as the API resolved it ("low" unless asked otherwise).
    A refused edit records neither. A request line of a batch is recorded in `batch_calls`,
    never in `calls`, with its batch's `batch_id` and its own `custom_id`, and `path` the
    line's url.
    """

    prompt: str | None
    width: int | None
    height: int | None
    body: dict[str, Any]
    status: int
    fault: str | None
    headers: dict[str, str]
    path: str = ""
    model: str | None = None
    n: int = 1
    usage: dict[str, Any] | None = None
    inputs: list[str] = dataclasses.field(default_factory=list)
    mask: str | None = None
    input_fidelity: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None


def _redacted(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: "<redacted>" if k in _SECRET_HEADERS else v for k, v in headers.items()}


class _Records:
    """The calls answered since the last reset, the batches' request lines, and how many
    calls were handled at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arrivals = itertools.count()
        self._epoch = 0
        self._in_flight = 0
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._epoch += 1  # calls still in flight across a reset are not recorded
            self._calls: list[tuple[int, RecordedCall]] = []
            self._batch_calls: list[RecordedCall] = []
            self._peak = 0

    @property
    def epoch(self) -> int:
        with self._lock:
            return self._epoch

    def arrive(self) -> tuple[int, int]:
        """The arrival number of a call just received, and the epoch it arrived in."""
        with self._lock:
            return next(self._arrivals), self._epoch

    def add(self, arrival: int, epoch: int, call: RecordedCall) -> None:
        """Record a call in its place by arrival, unless a reset came since `epoch`."""
        with self._lock:
            if epoch == self._epoch:
                bisect.insort(self._calls, (arrival, call), key=lambda item: item[0])

    def add_batch(self, epoch: int, call: RecordedCall) -> None:
        """Record a batch's request line, unless the emulator was reset since `epoch`."""
        with self._lock:
            if epoch == self._epoch:
                self._batch_calls.append(call)

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """Count a call as in flight while it is handled, for `peak`."""
        with self._lock:
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    @property
    def calls(self) -> list[RecordedCall]:
        with self._lock:
            return [call for _, call in self._calls]

    @property
    def batch_calls(self) -> list[RecordedCall]:
        with self._lock:
            return list(self._batch_calls)

    @property
    def peak(self) -> int:
        with self._lock:
            return self._peak
