"""The generation task: one paid call, retried when that can help, cached for good."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger
from prefect.runtime import task_run
from prefect.utilities.annotations import BaseAnnotation

from prefect_gpt_image.block_refs import resolve_credentials
from prefect_gpt_image.blocks.credentials import RapidAPICredentials
from prefect_gpt_image.caching import generation_cache_policy
from prefect_gpt_image.errors import GptImageError
from prefect_gpt_image.models import ApiLimits, GeneratedImage, ImageRequest, as_request
from prefect_gpt_image.object_keys import slugify
from prefect_gpt_image.retry_policy import (
    GENERATION_RETRIES,
    GENERATION_RETRY_DELAYS,
    RETRY_JITTER_FACTOR,
    retry_condition,
)

_paid_calls_so_far: dict[str, int] = {}
"""Charged answers of a task run's failed attempts, so its result can count them."""


def _run_name() -> str:
    request = task_run.parameters.get("request", "")
    if isinstance(request, BaseAnnotation):  # quote(request): named before it is unwrapped
        request = request.unwrap()
    label = (request.name or request.prompt) if isinstance(request, ImageRequest) else str(request)
    return f"generate-{slugify(label, max_chars=40)}"


@task(
    name="generate-image",
    task_run_name=_run_name,
    retries=GENERATION_RETRIES,
    retry_delay_seconds=GENERATION_RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER_FACTOR,
    retry_condition_fn=retry_condition,
    cache_policy=generation_cache_policy(),
    persist_result=True,
    # The result is on disk; an in-memory copy of the last thousand images is not needed.
    cache_result_in_memory=False,
)
def generate_image(
    request: ImageRequest | str,
    credentials: RapidAPICredentials | str | None = None,
    limits: ApiLimits | None = None,
) -> GeneratedImage:
    """Generate one image, download it and check it.

    Args:
        request: What to generate: an `ImageRequest`, or just a prompt.
        credentials: A `RapidAPICredentials` block, a saved block's name, or None to
            read `RAPIDAPI_KEY` and its siblings from the environment.
        limits: How busy this process may keep the API: requests in flight, requests
            per second, Prefect global limits. Runs in one process share them.

    Returns:
        The image with its bytes, media type, SHA-256 and dimensions. The result is
        persisted and cached: the same request (prompt, size, extras, host, model)
        is served from the cache in later runs instead of being paid for again.
        Change the expiry with `generate_image.with_options(cache_expiration=...)`.

    Rate limits, 5xx answers, timeouts and lost connections are retried (see
    `prefect_gpt_image.retry_policy`); a rejected key, prompt or size fails at once.
    """
    image_request = as_request(request)
    creds = resolve_credentials(credentials)
    creds.check_request(image_request)
    run_id = task_run.id
    paid_before = _paid_calls_so_far.pop(run_id, 0) if run_id else 0
    try:
        image = creds.get_client().generate(image_request, limits)
    except GptImageError as exc:
        # A charged answer that failed is paid again by the retry: count both.
        exc.paid_calls = paid_before + exc.billed
        if run_id and exc.paid_calls:
            _paid_calls_so_far[run_id] = exc.paid_calls
        raise
    image.paid_calls += paid_before
    get_run_logger().info(
        "Generated %r: %s %dx%d, %d bytes",
        image_request.label,
        image.media_type,
        image.width,
        image.height,
        len(image.data),
    )
    return image
