"""The retry policy, in one place: what is retried, how often, and how long to wait.

Retries are Prefect's own, so each one shows in the UI as a retry; the uploads the batch
flow makes without a task run follow the same policy through `call_with_retries`. Prefect fixes the
delays when a task is defined, so a server's Retry-After is honoured by the
endpoint gate instead (see `throttle`), which holds back every request to that
endpoint, not just the one that was told to wait.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from prefect.tasks import exponential_backoff

T = TypeVar("T")

GENERATION_RETRIES = 4
GENERATION_RETRY_DELAYS = exponential_backoff(backoff_factor=2)(GENERATION_RETRIES)
"""2, 4, 8 and 16 seconds, spread by the jitter below."""

UPLOAD_RETRIES = 3
UPLOAD_RETRY_DELAYS = exponential_backoff(backoff_factor=1)(UPLOAD_RETRIES)

RETRY_JITTER_FACTOR = 0.5
"""Delays vary by up to half their length, so a batch's retries do not arrive together."""

MAX_SERVER_WAIT_SECONDS = 60.0
"""The cap on a Retry-After or rate-limit reset honoured as given."""

DOWNLOAD_ATTEMPTS = 3
"""Downloads of an already paid image are retried within the generation attempt."""


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt can help: our errors say so; anything else is a bug."""
    return bool(getattr(exc, "retryable", False))


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """A task's `retry_condition_fn`: retry only what `is_retryable` allows."""
    return isinstance(state.data, BaseException) and is_retryable(state.data)


def call_with_retries(call: Callable[[], T], delays: Sequence[float] = UPLOAD_RETRY_DELAYS) -> T:
    """Make `call`, retrying what `is_retryable` allows after `delays` (with the same
    jitter): Prefect's retries for work done outside a task run."""
    for delay in delays:
        try:
            return call()
        except Exception as exc:
            if not is_retryable(exc):
                raise
            time.sleep(delay * (1 + RETRY_JITTER_FACTOR * random.uniform(-1, 1)))
    return call()
