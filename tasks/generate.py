"""The generation task: one paid call, retried when that can help, cached for good."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.runtime import task_run
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect_aws import S3Bucket

from prefect_gpt_image._billing import run_budget
from prefect_gpt_image._caching import (
    cache_store,
    combined_key,
    find_cached,
    generation_cache_policy,
    keys_by_route,
    remember,
)
from prefect_gpt_image._edits import checked_edit
from prefect_gpt_image._object_keys import slugify
from prefect_gpt_image._retry_policy import GENERATION_TASK_RETRIES
from prefect_gpt_image._routes import Route, route_book, serving_routes
from prefect_gpt_image.blocks._loading import Routes, resolve_routes
from prefect_gpt_image.errors import GptImageError
from prefect_gpt_image.models import ApiLimits, GeneratedImage, ImageRequest, as_request


def _run_name() -> str:
    request = task_run.parameters.get("request", "")
    label = request.label if isinstance(request, ImageRequest) else str(request)
    return f"generate-{slugify(label, max_chars=40)}"


@dataclass(frozen=True)
class _Call:
    """What one task run works out before it pays: the request with its inputs checked, the
    routes that may serve it, in order, and the request's key through each."""

    task_run_id: str
    request: ImageRequest
    routes: list[Route]
    route_keys: list[str]

    @classmethod
    def of(cls, task_run_id: str, parameters: dict[str, Any]) -> _Call:
        """Worked out once per task run, by its cache key, and found again by the call, in
        the same context: an input is read once, a saved route loaded once."""
        known = _this_call.get()
        if known is not None and known.task_run_id == task_run_id:
            return known
        request = checked_edit(
            as_request(parameters["request"]), bucket=parameters.get("input_bucket")
        )
        routes = serving_routes(request, resolve_routes(parameters.get("credentials")))
        call = cls(task_run_id, request, routes, keys_by_route(request, routes))
        _this_call.set(call)
        return call


_this_call: ContextVar[_Call | None] = ContextVar("_this_call", default=None)


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The image's key (`_caching.combined_key`): its request, through its routes."""
    return combined_key(_Call.of(str(context.task_run.id), parameters).route_keys)


_TASK_OPTIONS: dict[str, Any] = dict(
    name="generate-image",
    task_run_name=_run_name,
    **GENERATION_TASK_RETRIES,
    cache_policy=generation_cache_policy(_cache_key),
    persist_result=True,
    # The result is on disk; an in-memory copy of the last thousand images is not needed.
    cache_result_in_memory=False,
)
"""The twins' options: the same retries, and the same cache, so each serves the other's
images."""


@task(**_TASK_OPTIONS)
async def agenerate_image(
    request: ImageRequest | str,
    credentials: Routes = None,
    limits: ApiLimits | None = None,
    input_bucket: S3Bucket | None = None,
) -> GeneratedImage:
    """`generate_image` for async flows: the same call, retries and cache, awaited.

    Args:
        request: What to generate: an `ImageRequest`, or just a prompt.
        credentials: The route or routes to the model, as for `generate_image`.
        limits: How busy this process may keep the API.
        input_bucket: Where an edit's `s3://` inputs are read from, with its credentials
            (default: the environment's).

    Returns:
        The image, as `generate_image` returns it.

    Example:
        Generate two images at once in an async flow:
        ```python
        import asyncio

        from prefect import flow
        from prefect_gpt_image import agenerate_image

        @flow
        async def launch_visuals():
            return await asyncio.gather(
                agenerate_image("a mug on an oak table", credentials="gpt-image-credentials"),
                agenerate_image("a mug on a beach", credentials="gpt-image-credentials"),
            )
        ```
    """
    return await run_sync_in_worker_thread(_generate, request, credentials, limits, input_bucket)


@task(**_TASK_OPTIONS)
def generate_image(
    request: ImageRequest | str,
    credentials: Routes = None,
    limits: ApiLimits | None = None,
    input_bucket: S3Bucket | None = None,
) -> GeneratedImage:
    """Generate the images of one request, download them and check them.

    Args:
        request: What to generate: an `ImageRequest`, or just a prompt.
        credentials: The route to the model: a `RapidAPICredentials` or
            `OpenAICredentials` block, a saved block's name, an ordered list of those
            (the next is used when one is dropped), or None to read `RAPIDAPI_KEY` and
            its siblings from the environment.
        limits: How busy this process may keep the API: requests in flight, requests
            per second, Prefect global limits. Runs in one process share them.
        input_bucket: For an edit, the `S3Bucket` whose credentials read its `s3://`
            inputs (default: the environment's AWS credentials).

    Returns:
        The image with its bytes, media type, SHA-256, dimensions, route, model and cost
        (with `n` above one, the others in `more_images`). The result is persisted and
        cached: the same request (prompt, size, fields, endpoint, model) is served from
        the cache in later runs instead of being paid for again. Change the expiry with
        `generate_image.with_options(cache_expiration=...)`.

    Rate limits, 5xx answers, timeouts and lost connections are retried (see
    `prefect_gpt_image._retry_policy`); a rejected prompt or size fails at once. A route
    that retired the model, rejects the key or is out of quota is dropped for the rest
    of the flow run, and the next route takes the request (`prefect_gpt_image._routes`).

    Example:
        Generate on gpt-image-2 through OpenAI, with RapidAPI as the fallback:
        ```python
        from prefect import flow
        from prefect_gpt_image import ImageRequest, generate_image

        @flow
        def hero_image():
            return generate_image(
                ImageRequest(prompt="a mug on an oak table", width=1536, height=864),
                credentials=["openai-gpt-image", "gpt-image-credentials"],
            )
        ```
    """
    return _generate(request, credentials, limits, input_bucket)


def _generate(
    request: ImageRequest | str,
    credentials: Routes,
    limits: ApiLimits | None,
    input_bucket: S3Bucket | None,
) -> GeneratedImage:
    """One generation, on the first live route that serves it; in a task run."""
    # Inputs checked, and routes that cannot serve it left out, before anything is paid.
    run_id, context = str(task_run.id), TaskRunContext.get()
    parameters = {"request": request, "credentials": credentials, "input_bucket": input_bucket}
    call = _Call.of(run_id, parameters)
    image_request, routes = call.request, call.routes
    for route in routes:
        route.check_request(image_request)
    if len(routes) > 1 and context is not None:
        store = cache_store(context.task)
        # Prefect looked under the combined key; a route's own may hold it too.
        if (cached := find_cached(store, call.route_keys)) is not None:
            update = {"request": image_request, "paid_calls": 0, "cost_usd": 0.0}
            return cached.model_copy(update=update)
    book, budget = route_book(), run_budget()
    live = book.live(routes)
    for number, route in enumerate(live):
        try:
            image = route.get_client().generate(
                image_request,
                limits,
                still_live=partial(book.is_live, route),
                budget=budget,
                charged_to=run_id,
                input_bucket=input_bucket,
            )
        except GptImageError as exc:  # its text holds no key: the client is `keyless`
            if book.failed(route, exc, fallback=number + 1 < len(live)):
                continue
            raise
        book.succeeded(route)
        # Every attempt's charges: a broken answer is paid, and so is the retry after it.
        charges = budget.charges_of(run_id)
        image.paid_calls, image.cost_usd = charges.calls, charges.usd
        image.possibly_charged_usd = charges.possibly_usd
        if len(routes) > 1 and context is not None:
            key = call.route_keys[routes.index(route)]
            remember(cache_store(context.task), key, image, context.task.cache_expiration)
        get_run_logger().debug(  # one line per image: the flow tells the run as a whole
            "Generated %r through %s: %d %s image(s) %dx%d, $%.4f",
            image_request.label,
            route.route_name,
            image.image_count,
            image.media_type,
            image.width,
            image.height,
            image.cost_usd,
        )
        return image
    raise book.exhausted(routes)
