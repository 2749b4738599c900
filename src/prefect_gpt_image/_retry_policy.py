"""The retry policy, in one place: what is retried, how often, and how long to wait.

- Generations and uploads are retried by Prefect, so each retry shows in the UI; the
  uploads the flow makes without a task run follow the same policy through
  `call_with_retries`.
- A paid image's download is retried within its generation attempt: the API gives no
  way to fetch it again later.
- The Batch API's own calls (files, batches) are free and made outside task runs: they
  follow `call_with_retries` too. The requests inside a batch are the API's to retry.
- Each S3 request is also retried by botocore itself, for throttling and lost
  connections, beneath the upload's own retries.
- Prefect fixes a task's delays when it is defined, so a server's Retry-After (parsed in
  `_rate_limit_headers`) is honoured by the throttle instead, up to `MAX_SERVER_WAIT_SECONDS`,
  which holds back every request to that endpoint, not just the one that was told to wait.
- With several routes, a route that keeps failing is given up for the rest of the run
  (`_routes.RouteBook`) after the thresholds below, and the request moves to the next.

What is retried is the error's to say: each error type in `errors` carries `retryable` (and
`drops_route`), set where the answer is classified; this module decides what that means.

Each `*_DELAYS` table is a list, which Prefect's tasks and `call_with_retries` read when a
wait is due: the test suite zeroes them in place where the delays are not its subject.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from prefect.tasks import exponential_backoff

T = TypeVar("T")

GENERATION_RETRIES = 4
GENERATION_RETRY_DELAYS = [1.0, 4.0, 8.0, 16.0]
"""Seconds before each retry, spread by the jitter below: the first soon, for the odd 429 or
5xx of a busy API (a run's slowest prompts are the ones that wait); the others doubling,
for an outage, which they ride out for about half a minute in all."""

UPLOAD_RETRIES = 3
UPLOAD_RETRY_DELAYS = exponential_backoff(backoff_factor=1)(UPLOAD_RETRIES)

RETRY_JITTER_FACTOR = 0.5
"""Delays vary by up to half their length, so a run's retries do not arrive together."""

MAX_SERVER_WAIT_SECONDS = 60.0
"""The cap on a Retry-After or rate-limit reset honoured as given."""

DOWNLOAD_RETRY_DELAYS = [1.0, 2.0]
"""Waits before the second and third try of a paid image's download."""
DOWNLOAD_ATTEMPTS = len(DOWNLOAD_RETRY_DELAYS) + 1

BATCH_API_RETRY_DELAYS = [1.0, 2.0, 4.0, 8.0]
"""Waits between tries of a Batch API call (upload, create, retrieve, download): made
outside a task run, and free, unlike a generation."""

S3_ATTEMPTS_PER_REQUEST = 4
"""botocore's tries of one S3 request, in its standard retry mode."""

DOWN_AFTER_FAILURES = GENERATION_RETRIES + 1
"""Retryable failures in a row, with no success between, after which a route is down: the
whole retry budget of one request."""
PAID_FAILURES_BEFORE_BREAKING = 3
"""Charged answers in a row that held no usable image, after which a route is not paid
again in this run: a systematic fault (every image URL answering 403, say) would otherwise
be paid for on every request and every retry."""


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt can help: our errors say so; anything else is a bug."""
    return bool(getattr(exc, "retryable", False))


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """A task's `retry_condition_fn`: retry only what `is_retryable` allows."""
    return isinstance(state.data, BaseException) and is_retryable(state.data)


def call_with_retries(
    call: Callable[[], T],
    delays: Sequence[float] = UPLOAD_RETRY_DELAYS,
    *,
    retry_if: Callable[[Exception], bool] = is_retryable,
) -> T:
    """Make `call`, retrying what `retry_if` allows after `delays` (with the same
    jitter): Prefect's retries for work done outside a task run."""
    for delay in delays:
        try:
            return call()
        except Exception as exc:
            if not retry_if(exc):
                raise
            time.sleep(delay * (1 + RETRY_JITTER_FACTOR * random.uniform(-1, 1)))
    return call()


GENERATION_TASK_RETRIES: dict[str, Any] = dict(
    retries=GENERATION_RETRIES,
    retry_delay_seconds=GENERATION_RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER_FACTOR,
    retry_condition_fn=retry_condition,
)
"""The generation task's retry options, for Prefect's `@task`."""

UPLOAD_TASK_RETRIES: dict[str, Any] = dict(
    retries=UPLOAD_RETRIES,
    retry_delay_seconds=UPLOAD_RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER_FACTOR,
    retry_condition_fn=retry_condition,
)
"""The upload task's retry options, for Prefect's `@task`."""
