"""The batch flow: a prompt set in, every good image in the bucket, a manifest beside them."""

from __future__ import annotations

import json
import logging
import queue
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Annotated, Any
from urllib.parse import urlsplit

from prefect import Task, flow
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.results import ResultStore
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from prefect_aws import S3Bucket
from pydantic import Field

from prefect_gpt_image import progress as progress_listeners
from prefect_gpt_image.artifacts import ProgressArtifact, publish_results
from prefect_gpt_image.batch import Batch
from prefect_gpt_image.block_refs import Routes, resolve_bucket, resolve_routes
from prefect_gpt_image.blocks._route import GptImageRoute
from prefect_gpt_image.budget import run_budget
from prefect_gpt_image.caching import (
    cache_store,
    ensure_kept,
    fallback_store,
    find_cached,
    generation_cache_policy,
)
from prefect_gpt_image.errors import (
    BatchFailedError,
    BudgetExceededError,
    ConfigurationError,
    InvalidRequestError,
    StorageError,
)
from prefect_gpt_image.image_sizes import ImageSize, parse_size
from prefect_gpt_image.model_table import Background, Moderation, OutputFormat, Quality
from prefect_gpt_image.models import (
    ApiLimits,
    BatchReport,
    GeneratedImage,
    ImageRequest,
    StoredImage,
)
from prefect_gpt_image.object_keys import (
    check_bucket_name,
    check_key_room,
    image_key,
    join_key,
    manifest_key,
    normalize_prefix,
)
from prefect_gpt_image.prompt_sets import expand_template, load_prompts
from prefect_gpt_image.retry_policy import call_with_retries
from prefect_gpt_image.storage import (
    check_writable,
    object_link,
    object_sizes,
    object_uri,
    put_bytes,
    read_uri,
)
from prefect_gpt_image.tasks.generate import generate_image
from prefect_gpt_image.tasks.upload import store_image

FAILURES_LISTED = 20
"""How many failures the flow's failure message spells out."""


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
) -> BatchReport:
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
        prefix: The folder, within the bucket folder, for this batch's images.
        size: The size of prompts that do not give one: square, landscape, portrait,
            or any WIDTHxHEIGHT the model makes (gpt-image-2: multiples of 16).
        quality: low, medium, high or auto, for prompts that do not give one.
        n: Images per prompt, for prompts that do not say; each is stored and billed.
        output_format: png, jpeg or webp, for prompts that do not say.
        output_compression: jpeg and webp compression in %, for prompts that do not say.
        background: transparent, opaque or auto, for prompts that do not say.
        moderation: low or auto, for prompts that do not say.
        max_concurrency: Generations in flight at once.
        requests_per_second: The plan's rate limit. Without it the rate is learned from
            the API's 429s and rate-limit headers.
        max_cost_usd: A hard cap: refuse to start a batch whose uncached part could cost
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

    Returns:
        The `BatchReport`: stored images, failures, the manifest's key, images generated
        and from the cache, and the dollars spent. Every good image is stored and the
        manifest written before the run fails for more than `allow_failures` failures.
    """
    logger = get_run_logger()
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
    }
    requests = _requests(prompts, template, variables, defaults, s3)
    for request in requests:  # valid on every route it may take, before anything is paid
        for route in routes:
            route.check_request(request)

    generate = generate_image.with_options(
        refresh_cache=refresh_cache,
        cache_expiration=timedelta(days=cache_expiration_days) if cache_expiration_days else None,
    )
    cache_bucket = _saved(resolve_bucket(cache_storage)) if cache_storage is not None else None
    if cache_bucket is not None:
        generate = generate.with_options(result_storage=cache_bucket)
    if redis_lock_url is not None:
        _check_redis(redis_lock_url)
        generate = generate.with_options(cache_policy=generation_cache_policy(redis_lock_url))
    limits = ApiLimits(
        max_concurrency=max_concurrency,
        requests_per_second=requests_per_second,
        global_concurrency_limit=global_concurrency_limit,
        global_rate_limit=global_rate_limit,
    )
    _check_global_limits(limits)
    _check_storage(s3, folder, cache_bucket)
    run_budget().max_usd = max_cost_usd  # every paid attempt, retries too, is held to it
    batch = Batch(requests, routes)
    uncached = set(batch.groups)
    if not refresh_cache:
        uncached -= _reuse_cached(batch, generate, s3, folder)
    estimate = round(sum(batch.worst_case_usd[key] for key in uncached), 6)
    if max_cost_usd is not None and estimate > max_cost_usd + 1e-9:
        raise BudgetExceededError(
            f"This batch needs {len(uncached)} new generations, up to ${estimate:.2f} at "
            f"worst (auto quality priced as high), over max_cost_usd=${max_cost_usd:.2f}. "
            "Nothing was generated: raise max_cost_usd or trim the prompts."
        )
    logger.info(
        "Generating %d requests (%d distinct, %d new, at most $%.2f) into %s",
        len(requests),
        len(batch.groups),
        len(uncached),
        estimate,
        object_uri(s3, join_key(s3.bucket_folder, folder)),
    )

    progress = ProgressArtifact(total=len(requests))
    try:
        progress.update(batch.done)
        _generate_and_store(
            batch, generate, routes, limits, s3, folder, uncached, max_cost_usd, progress
        )
    finally:
        progress.close()

    report = batch.report()
    rows = batch.rows()
    _write_manifest(s3, folder, report, rows)
    logger.info("%s; manifest at %s", report.summary(), report.manifest_uri)
    link = partial(
        object_link, s3, public_base_url=public_base_url, expires_in=int(link_expiry_hours * 3600)
    )
    publish_results(rows, report, link)

    if batch.stopped_by is not None or len(report.failures) > allow_failures:
        raise BatchFailedError(_failure_message(batch, report, allow_failures), report)
    return report


def _requests(
    prompts: list[str | ImageRequest] | str | None,
    template: str | None,
    variables: dict[str, list[str]] | None,
    defaults: dict[str, Any],
    bucket: S3Bucket,
) -> list[ImageRequest]:
    """The batch's requests, from a prompt set or a template; all checked, none paid for."""
    if (prompts is None) == (template is None):
        raise InvalidRequestError("Give either prompts or a template (with variables).")
    if template is not None:
        return expand_template(template, variables or {}, defaults=defaults)
    assert prompts is not None
    return load_prompts(prompts, defaults=defaults, read_uri=partial(read_uri, bucket))


def _check_global_limits(limits: ApiLimits) -> None:
    """A global limit that does not exist would fail every request: say so before any."""
    names = [n for n in (limits.global_concurrency_limit, limits.global_rate_limit) if n]
    if not names:
        return
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                raise ConfigurationError(
                    f"No Prefect global concurrency limit named {name!r}: create it with "
                    f"`prefect gcl create {name} --limit N` (add --slot-decay-per-second "
                    "for a rate limit)."
                ) from None
            if name == limits.global_rate_limit and not limit.slot_decay_per_second:
                raise ConfigurationError(
                    f"The global concurrency limit {name!r} has no slot decay, so it cannot "
                    "limit a rate: give it one, or pass it as global_concurrency_limit."
                )


def _check_redis(url: str) -> None:
    """An unreachable lock store would fail every request: say so before any."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=5).ping()
    except (redis.RedisError, ValueError) as exc:
        raise ConfigurationError(
            f"Cannot reach the Redis for the cache's locks at {_without_password(url)}: {exc}"
        ) from None


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()


def _check_storage(bucket: S3Bucket, folder: str, cache_bucket: S3Bucket | None) -> None:
    """A missing bucket, a wrong secret or a key too long would be found only after paying
    for every image: find them now."""
    check_key_room(bucket.bucket_folder, folder)
    check_writable(bucket, join_key(bucket.bucket_folder, folder))
    if cache_bucket is not None:
        check_writable(cache_bucket, cache_bucket.bucket_folder)


def _write_manifest(
    bucket: S3Bucket, folder: str, report: BatchReport, rows: list[dict[str, Any]]
) -> None:
    """The manifest beside the images; if S3 refuses it now, a local copy, so the report
    and the artifacts still come out."""
    key = manifest_key(bucket.bucket_folder, folder, _run_label())
    manifest = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    try:
        put_bytes(bucket, key, manifest, "application/x-ndjson")
    except StorageError as exc:
        local = get_current_settings().home / "manifests" / key.rsplit("/", 1)[-1]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(manifest)
        get_run_logger().error(
            "Could not write the manifest to %s (%s); it is at %s",
            object_uri(bucket, key),
            exc,
            local,
        )
        report.manifest_key, report.manifest_uri = None, local.as_uri()
        return
    report.manifest_key, report.manifest_uri = key, object_uri(bucket, key)


def _saved(block: S3Bucket) -> S3Bucket:
    """Prefect stores a cache's location as a block reference: the block must be saved."""
    if block._block_document_id is None:
        raise ConfigurationError(
            "cache_storage must be a saved S3Bucket block (or its name): save it with "
            ".save('NAME') or in the Prefect UI, so that every worker can load it."
        )
    return block


def _reuse_cached(
    batch: Batch, generate: Task[..., GeneratedImage], bucket: S3Bucket, folder: str
) -> set[str]:
    """Find the requests already in the cache, and record at once those whose objects are
    in the bucket too: a re-run then costs a cache read per image, not a task run.

    Returns the cached keys. One image is in memory at a time.
    """
    store, fallback = cache_store(generate), fallback_store()
    folder_prefix = join_key(bucket.bucket_folder, folder)
    in_bucket: dict[str, int] | None = None
    cached = set()
    for key in batch.groups:
        keys = batch.lookup_keys(key)
        if (image := find_cached(store, keys)) is None:
            if (image := find_cached(fallback, keys)) is None:
                continue
            # Kept locally while the cache storage was down: back where the task looks.
            store.write(image, key=key)
        cached.add(key)
        if in_bucket is None:
            in_bucket = _object_sizes(bucket, folder_prefix + "/" if folder_prefix else "")
        stored = [
            (
                index,
                StoredImage.of(
                    named := variant.model_copy(update={"request": batch.requests[index]}),
                    bucket.bucket_name,
                    image_key(bucket.bucket_folder, folder, named),
                ),
            )
            for variant in image.variants()
            for index in batch.uploads(key)
        ]
        if all(in_bucket.get(record.key) == record.size for _, record in stored):
            batch.generated(key, image, cached=True)
            for index, record in stored:
                batch.stored(index, record)
    return cached


def _object_sizes(bucket: S3Bucket, prefix: str) -> dict[str, int]:
    """The bucket's objects under `prefix`; none if it cannot be listed, so that the
    uploads (which retry, and say what is wrong) run instead."""
    try:
        return object_sizes(bucket, prefix)
    except StorageError as exc:
        get_run_logger().warning("Could not list %s (%s); uploading every image", prefix, exc)
        return {}


def _generate_and_store(
    batch: Batch,
    generate: Task[..., GeneratedImage],
    routes: list[GptImageRoute],
    limits: ApiLimits,
    bucket: S3Bucket,
    folder: str,
    uncached: set[str],
    max_cost_usd: float | None,
    progress: ProgressArtifact,
) -> None:
    """Keep the API at its limits, and upload each image as it comes.

    Prefect's thread pool is unbounded, so the flow keeps a window of submissions: a
    new generation is submitted as one finishes, and uploads (cheap, and not the API's
    business) start at once. In one process the throttle holds requests in flight to
    `max_concurrency`, so the window can run ahead of it and the tasks' own work
    overlaps the API's; with workers in other processes the window is the bound.
    """
    events: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()

    def watch(stage: str, tag: Any, future: PrefectFuture[Any] | Future[Any]) -> None:
        future.add_done_callback(lambda done: events.put((stage, tag, done)))

    context = FlowRunContext.get()
    in_process = context is not None and isinstance(context.task_runner, ThreadPoolTaskRunner)
    max_concurrency = limits.max_concurrency or 1
    window = 2 * max_concurrency if in_process else max_concurrency
    waiting = deque(key for key in batch.groups if not batch.settled(key))
    in_flight: set[str] = set()

    def submit_generations() -> None:
        while waiting and len(in_flight) < window:
            key = waiting[0]
            if max_cost_usd is not None and key in uncached:
                worst = batch.worst_case_usd
                committed = (
                    batch.spent_usd + worst[key] + sum(worst[k] for k in in_flight & uncached)
                )
                if committed > max_cost_usd + 1e-9:
                    batch.stop(
                        BudgetExceededError(
                            f"The spend reached max_cost_usd=${max_cost_usd:.2f} "
                            f"(${batch.spent_usd:.2f} spent, more in flight)."
                        ),
                        not_attempted=list(waiting),
                    )
                    waiting.clear()
                    return
            waiting.popleft()
            request = batch.requests[batch.groups[key][0]]
            arguments: tuple[Any, ...] = (request, routes, limits)
            if in_process:
                # Nothing in these holds a future, so Prefect need not walk them; other
                # task runners (Dask) ship quoted arguments without unquoting them.
                arguments = tuple(quote(argument) for argument in arguments)
            watch("generate", key, generate.submit(*arguments))
            in_flight.add(key)

    cache, fallback = cache_store(generate), fallback_store()
    logger = get_run_logger()  # the upload threads have no run context of their own
    # Uploads run in the flow's own threads, not as task runs: a task run costs more CPU
    # than the upload itself, and the generation's task run already stands for the image.
    with ThreadPoolExecutor(max_concurrency, thread_name_prefix="upload") as uploads:
        submit_generations()
        while not batch.finished:
            stage, tag, future = events.get()
            if stage == "generate":
                in_flight.discard(tag)
                try:
                    outcome = future.result(raise_on_failure=False)
                except Exception as exc:  # the runner lost the task: a Dask worker died, say
                    outcome = exc
                if isinstance(outcome, GeneratedImage):
                    cached = future.state.name == "Cached"
                    batch.generated(tag, outcome, cached=cached)
                    if not cached:  # paid for: it must be kept somewhere before we report it
                        uploads.submit(_keep, cache, fallback, tag, outcome, logger)
                    for variant in outcome.variants():
                        for index in batch.uploads(tag):
                            store = partial(
                                store_image,
                                variant,
                                bucket,
                                folder,
                                batch.requests[index],
                                check_existing=cached,
                            )
                            watch("upload", index, uploads.submit(call_with_retries, store))
                else:
                    error = _exception(outcome)
                    batch.generation_failed(tag, error)
                    if getattr(error, "stops_batch", False) and waiting:
                        # Every other request would fail the same way, and may cost money.
                        batch.stop(error, not_attempted=list(waiting))
                        waiting.clear()
                submit_generations()
            elif (error := future.exception()) is None:
                batch.stored(tag, future.result()[0])
            else:
                batch.upload_failed(tag, error)
            progress.update(batch.done)
            progress_listeners.report(batch.done, len(batch.requests))


def _keep(
    store: ResultStore,
    fallback: ResultStore,
    key: str,
    image: GeneratedImage,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> None:
    if not ensure_kept(store, fallback, key, image):
        logger.warning(
            "The cache storage could not keep the image of %r; it is kept in local result "
            "storage instead, so the next run on this machine does not pay for it again.",
            image.request.label,
        )


def _failure_message(batch: Batch, report: BatchReport, allow_failures: int) -> str:
    stored = f"{len(report.images)} images are stored and listed in {report.manifest_uri}."
    if batch.stopped_by is not None:
        skipped = sum(f.stage == "not attempted" for f in report.failures)
        return (
            f"The batch stopped: {batch.stopped_by} {skipped} of {len(batch.requests)} prompts "
            f"were not attempted. {stored}"
        )
    listed = [f"- {f.prompt[:80]!r}: {f.error}" for f in report.failures[:FAILURES_LISTED]]
    if (more := len(report.failures) - FAILURES_LISTED) > 0:
        listed.append(f"... and {more} more")
    return (
        f"{len(report.failures)} of {len(batch.requests)} prompts failed "
        f"(allow_failures={allow_failures}); {stored}\n" + "\n".join(listed)
    )


def _exception(outcome: object) -> BaseException:
    return outcome if isinstance(outcome, BaseException) else RuntimeError(repr(outcome))


def _run_label() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{flow_run.name or 'local'}"
