"""The flow: a prompt set in, every good image in the bucket, a manifest beside them.

It reads top to bottom: resolve the inputs, plan (check everything that can be checked
before paying, and what the cache already holds), run (`batch_runner`), publish (the
manifest and the run's artifacts).
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Annotated, Any, Literal

from prefect import Task, flow
from prefect.logging import get_run_logger
from prefect_aws import S3Bucket
from pydantic import Field

from prefect_gpt_image._artifacts import ProgressArtifact, publish_results
from prefect_gpt_image._block_refs import Routes, resolve_bucket, resolve_routes, serving_routes
from prefect_gpt_image._budget import run_budget
from prefect_gpt_image._caching import generation_cache_policy
from prefect_gpt_image._edit_inputs import InputRef, expand_inputs
from prefect_gpt_image._edits import check_edits
from prefect_gpt_image._image_sizes import ImageSize, parse_size
from prefect_gpt_image._ledger import RunLedger
from prefect_gpt_image._manifest import write_manifest
from prefect_gpt_image._object_keys import check_bucket_name, join_key, normalize_prefix
from prefect_gpt_image._preflight import (
    batch_api_route,
    check_global_limits,
    check_redis,
    check_storage,
    saved_block,
)
from prefect_gpt_image._prompt_sets import PromptSet, expand_template, read_prompt_set
from prefect_gpt_image._run_story import tell_outcome, tell_plan
from prefect_gpt_image._runner import Runner
from prefect_gpt_image._storage import object_link, object_uri, read_uri
from prefect_gpt_image.errors import InvalidRequestError, RunFailedError
from prefect_gpt_image.model_table import (
    Background,
    Complexity,
    Moderation,
    OutputFormat,
    Quality,
)
from prefect_gpt_image.models import (
    ApiLimits,
    GeneratedImage,
    ImageRequest,
    InputFidelity,
    RunReport,
)
from prefect_gpt_image.tasks.generate import generate_image


@flow(name="generate-images")
def generate_images(
    prompts: list[str | ImageRequest] | str | None = None,
    *,
    bucket: S3Bucket | str,
    credentials: Routes = None,
    template: str | None = None,
    variables: dict[str, list[str]] | None = None,
    prefix: str = "",
    size: ImageSize | Annotated[str, Field(pattern=r"^[1-9]\d*x[1-9]\d*$")] = "1024x1024",
    quality: Quality | None = None,
    n: Annotated[int, Field(ge=1, le=10)] = 1,
    output_format: OutputFormat | None = None,
    output_compression: Annotated[int | None, Field(ge=0, le=100)] = None,
    background: Background | None = None,
    moderation: Moderation | None = None,
    complexity: Complexity | None = None,
    images: list[str] | str | None = None,
    input_roots: list[str] | None = None,
    mask: str | None = None,
    input_fidelity: InputFidelity | None = None,
    max_concurrency: Annotated[int, Field(ge=1, le=256)] = 8,
    requests_per_second: Annotated[float | None, Field(gt=0, le=1000)] = None,
    max_cost_usd: Annotated[float | None, Field(ge=0)] = None,
    allow_failures: Annotated[int, Field(ge=0)] = 0,
    refresh_cache: bool = False,
    cache_expiration_days: Annotated[float | None, Field(gt=0)] = None,
    cache_storage: S3Bucket | str | None = None,
    redis_lock_url: str | None = None,
    global_concurrency_limit: str | None = None,
    global_rate_limit: str | None = None,
    public_base_url: str | None = None,
    link_expiry_hours: Annotated[float, Field(gt=0, le=168)] = 24,
    mode: Literal["sync", "batch"] = "sync",
    batch_wait_minutes: Annotated[float, Field(ge=0, le=1440)] = 10,
    cancel_batches: bool = False,
) -> RunReport:
    """Generate an image for every prompt and store each one in the bucket.

    Args:
        prompts: Prompts or `ImageRequest`s, or the path or `s3://` URI of a `.txt`
            (one prompt a line), `.csv` (a `prompt` column) or `.jsonl` file.
        bucket: An `S3Bucket` block, a saved block's name, or `s3://bucket/folder`
            (with the environment's AWS credentials).
        credentials: The route to the model: a `RapidAPICredentials` or
            `OpenAICredentials` block or a saved block's name, or an ordered list of
            them (a route that retired the model, rejects the key or ran out of quota
            is dropped, and the next takes over), or None to read `RAPIDAPI_KEY`.
        template: Instead of `prompts`: a prompt with `{variables}`, such as
            "{product} on a {background} background".
        variables: The values of each template variable; every combination is
            generated, and named after its values.
        prefix: The folder, within the bucket folder, for this run's images.
        size: The size of prompts that do not give one: square, landscape, portrait,
            or any WIDTHxHEIGHT the model makes (gpt-image-2: multiples of 16).
        quality: low, medium, high or auto (xhigh and max on gpt-image-2.5 and 2.6), for
            prompts that do not give one.
        n: Images per prompt, for prompts that do not say; each is stored and billed.
        output_format: png, jpeg or webp, for prompts that do not say.
        output_compression: jpeg and webp compression in %, for prompts that do not say.
        background: transparent, opaque or auto, for prompts that do not say.
        moderation: low or auto, for prompts that do not say.
        complexity: low, medium or high (gpt-image-2.6), for prompts that do not say.
        images: To edit rather than generate: images to edit with every prompt, as a
            list of paths and `s3://` URIs, or one `s3://` folder or local directory of
            them. Each input is named in its objects' keys. Prompts that name their own
            images (a CSV `image` column, a JSONL `images` list) edit those instead.
        input_roots: Folders (local, or `s3://bucket/prefix/`) whose images a prompt file
            may name, besides those below its own folder. A row naming an image anywhere
            else is refused, and nothing is read for it: the file does not decide what
            the worker reads.
        mask: For edits: a PNG the size of every input, whose transparent pixels mark
            the area to repaint.
        input_fidelity: For edits: high or low, how closely to keep the inputs' features.
        max_concurrency: Generations in flight at once.
        requests_per_second: The plan's rate limit. Without it the rate is learned from
            the API's 429s and rate-limit headers.
        max_cost_usd: A hard cap: refuse to start a run whose uncached part could cost
            more, and send no call, first or retry, whose worst case could pass it.
        allow_failures: Failed prompts tolerated before the run ends Failed.
        refresh_cache: Generate again even where a cached image exists (and pay).
        cache_expiration_days: How long generated images are served from the cache;
            None keeps them for good.
        cache_storage: Where the generation cache lives: an `S3Bucket` block or its
            name, shared by workers on other machines. Default: Prefect's result storage.
        redis_lock_url: A Redis (redis://host:6379/0) that holds the generation cache's
            locks, so that workers on several machines sharing `cache_storage` pay once for
            a new image; default: GPT_IMAGE_REDIS_LOCK_URL, else files on this machine.
        global_concurrency_limit: The name of a Prefect global concurrency limit that
            caps requests in flight across all workers.
        global_rate_limit: The name of a Prefect global concurrency limit with slot
            decay that caps requests per second across all workers.
        public_base_url: Where the bucket is served publicly (a CDN), for the links
            in the run's artifacts; without it they are presigned URLs.
        link_expiry_hours: How long presigned links in the artifacts work.
        mode: "sync" calls the API for each image; "batch" sends the new requests through
            OpenAI's Batch API, at half the price, answered within 24 hours. A batch run
            collects what is ready and leaves the rest to a later run with the same prompts
            (a schedule every 15 minutes, say), which pays nothing more.
        batch_wait_minutes: With mode "batch": how long this run waits for its batches
            before leaving them to a later run.
        cancel_batches: With mode "batch": cancel the batches of these prompts, store what
            they answered already, and send nothing new.

    Returns:
        The `RunReport`: stored images, failures, the manifest's key, images generated
        and from the cache, and the dollars spent. Every good image is stored and the
        manifest written before the run fails for more than `allow_failures` failures.

    Example:
        Generate a template's every combination into a saved bucket, through OpenAI with
        RapidAPI as the fallback, for at most five dollars:
        ```python
        from prefect_gpt_image import generate_images

        report = generate_images(
            template="a {product} on a {background} background",
            variables={"product": ["mug", "tote bag"], "background": ["white", "oak"]},
            bucket="BLOCK_NAME",
            credentials=["openai-gpt-image", "gpt-image-credentials"],
            prefix="spring-campaign",
            max_cost_usd=5,
        )
        print(report.summary())
        ```
    """
    logger = get_run_logger()
    # Resolve: the routes, the bucket and every request, each checked on every route.
    routes = resolve_routes(credentials)
    s3 = resolve_bucket(bucket)
    check_bucket_name(s3.bucket_name)
    folder = normalize_prefix(prefix)
    width, height = parse_size(size)
    defaults = {
        "width": width,
        "height": height,
        "quality": quality,
        "n": n,
        "output_format": output_format,
        "output_compression": output_compression,
        "background": background,
        "moderation": moderation,
        "complexity": complexity,
    }
    prompt_set = _prompt_set(prompts, template, variables, defaults, s3, input_roots or [])
    requests, refused = prompt_set.requests, prompt_set.refused
    if images is not None:
        requests, refused = _edits_of(
            prompt_set, expand_inputs(images, bucket=s3), mask, input_fidelity
        )
    requests, refused = check_edits(requests, bucket=s3, refused=refused)
    batch_route = batch_api_route(routes, requests) if mode == "batch" else None
    if batch_route is not None:  # through its Batch API alone
        routes = [batch_route]
    for request in requests:  # valid on every route it may take, before anything is paid
        for route in serving_routes(request, routes):
            route.check_request(request)
    limits = ApiLimits(
        max_concurrency=max_concurrency,
        requests_per_second=requests_per_second,
        global_concurrency_limit=global_concurrency_limit,
        global_rate_limit=global_rate_limit,
    )
    cache_bucket = saved_block(resolve_bucket(cache_storage)) if cache_storage is not None else None
    generate = _generation_task(refresh_cache, cache_expiration_days, cache_bucket, redis_lock_url)

    # Plan: what would fail after paying fails now; what is cached is not sent again.
    check_global_limits(limits)
    check_storage(s3, folder, cache_bucket)
    run_budget().max_usd = max_cost_usd  # every paid attempt, retries too, is held to it
    ledger = RunLedger(requests, routes, refused, batch_api=mode == "batch")
    link = partial(
        object_link, s3, public_base_url=public_base_url, expires_in=int(link_expiry_hours * 3600)
    )
    runner = Runner(ledger, generate, routes, limits, s3, folder, max_cost_usd, link)
    if not refresh_cache:
        runner.reuse_cached()
    runner.check_budget()
    tell_plan(logger, ledger, runner, object_uri(s3, join_key(s3.bucket_folder, folder)))

    # Run.
    progress = ProgressArtifact(total=len(requests))
    try:
        progress.update(ledger.done)
        if batch_route is not None:
            wait_seconds = batch_wait_minutes * 60
            runner.run_batch_api(
                progress, batch_route, wait_seconds=wait_seconds, cancel=cancel_batches
            )
        else:
            runner.run(progress)
    finally:
        progress.close()

    # Publish: the manifest, the table and the gallery, then the verdict.
    report = ledger.report()
    rows = ledger.rows()
    write_manifest(s3, folder, report, rows)
    tell_outcome(logger, report)
    publish_results(rows, report, runner.link)
    if ledger.failed(report, allow_failures):
        raise RunFailedError(ledger.failure_message(report, allow_failures), report)
    return report


def _prompt_set(
    prompts: list[str | ImageRequest] | str | None,
    template: str | None,
    variables: dict[str, list[str]] | None,
    defaults: dict[str, Any],
    bucket: S3Bucket,
    input_roots: list[str],
) -> PromptSet:
    """The run's requests, from a prompt set or a template; all checked, none paid for."""
    if (prompts is None) == (template is None):
        raise InvalidRequestError("Give either prompts or a template (with variables).")
    if template is not None:
        return PromptSet(expand_template(template, variables or {}, defaults=defaults))
    assert prompts is not None
    return read_prompt_set(
        prompts, defaults=defaults, read_uri=partial(read_uri, bucket), input_roots=input_roots
    )


def _edits_of(
    prompt_set: PromptSet,
    inputs: list[InputRef],
    mask: str | None,
    input_fidelity: InputFidelity | None,
) -> tuple[list[ImageRequest], dict[int, InvalidRequestError]]:
    """Every input edited with every prompt, but for prompts that name their own inputs;
    and the refused prompts (all of which name their own), at their new positions."""
    if not inputs:
        raise InvalidRequestError("images names no image to edit.")
    edits: list[ImageRequest] = []
    refused: dict[int, InvalidRequestError] = {}
    for index, request in enumerate(prompt_set.requests):
        if request.is_edit:
            if index in prompt_set.refused:
                refused[len(edits)] = prompt_set.refused[index]
            edits.append(request)
            continue
        fields = {"mask": mask, "input_fidelity": input_fidelity or request.input_fidelity}
        edits += [request.model_copy(update={"images": (ref,), **fields}) for ref in inputs]
    return edits, refused


def _generation_task(
    refresh_cache: bool,
    cache_expiration_days: float | None,
    cache_bucket: S3Bucket | None,
    redis_lock_url: str | None,
) -> Task[..., GeneratedImage]:
    """`generate_image` with this run's cache options."""
    generate = generate_image.with_options(
        refresh_cache=refresh_cache,
        cache_expiration=timedelta(days=cache_expiration_days) if cache_expiration_days else None,
    )
    if cache_bucket is not None:
        generate = generate.with_options(result_storage=cache_bucket)
    if redis_lock_url is not None:
        check_redis(redis_lock_url)
        generate = generate.with_options(cache_policy=generation_cache_policy(redis_lock_url))
    return generate
