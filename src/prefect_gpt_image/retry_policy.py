"""The retry policy, in one place: what is retried, how often, and how long to wait.

Retries are Prefect's own, so each one shows in the UI as a retry. Prefect fixes the
delays when a task is defined, so a server's Retry-After is honoured by the
endpoint gate instead (see `throttle`), which holds back every request to that
endpoint, not just the one that was told to wait.
"""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

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
