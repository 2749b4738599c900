"""The batch flow: a prompt set in, every good image in the bucket, a manifest beside them."""

from __future__ import annotations

import json
import queue
from collections import deque
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Annotated, Any

from prefect import Task, flow
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect_aws import S3Bucket
from pydantic import Field

from prefect_gpt_image import progress as progress_listeners
from prefect_gpt_image.artifacts import ProgressArtifact, publish_results
from prefect_gpt_image.block_refs import resolve_bucket, resolve_credentials
from prefect_gpt_image.blocks.credentials import RapidAPICredentials
from prefect_gpt_image.caching import generation_cache_key
from prefect_gpt_image.errors import BatchFailedError, InvalidRequestError
from prefect_gpt_image.models import (
    BatchReport,
    FailureStage,
    GeneratedImage,
    ImageRequest,
    PromptFailure,
    StoredImage,
)
from prefect_gpt_image.object_keys import (
    check_bucket_name,
    join_key,
    manifest_key,
    normalize_prefix,
)
from prefect_gpt_image.prompt_sets import expand_template, load_prompts
from prefect_gpt_image.storage import object_link, object_uri, put_bytes, read_uri
from prefect_gpt_image.tasks.generate import generate_image
from prefect_gpt_image.tasks.upload import upload_image

FAILURES_LISTED = 20
"""How many failures the flow's failure message spells out."""


@flow(name="generate-images")
def generate_images(
    prompts: list[str | ImageRequest] | str | None = None,
    *,
    bucket: S3Bucket | str,
    credentials: RapidAPICredentials | str | None = None,
    template: str | None = None,
    variables: dict[str, list[str]] | None = None,
    prefix: str = "",
    width: Annotated[int, Field(ge=64, le=4096)] = 1024,
    height: Annotated[int, Field(ge=64, le=4096)] = 1024,
    max_concurrency: Annotated[int, Field(ge=1, le=256)] = 8,
    allow_failures: Annotated[int, Field(ge=0)] = 0,
    refresh_cache: bool = False,
    cache_expiration_days: Annotated[float | None, Field(gt=0)] = None,
    public_base_url: str | None = None,
    link_expiry_hours: Annotated[float, Field(gt=0, le=168)] = 24,
) -> BatchReport:
    """Generate an image for every prompt and store each one in the bucket.

    Args:
        prompts: Prompts or `ImageRequest`s, or the path or `s3://` URI of a `.txt`
            (one prompt a line), `.csv` (a `prompt` column) or `.jsonl` file.
        bucket: An `S3Bucket` block, a saved block's name, or `s3://bucket/folder`
            (with the environment's AWS credentials).
        credentials: A `RapidAPICredentials` block, a saved block's name, or None to
            read `RAPIDAPI_KEY` from the environment.
        template: Instead of `prompts`: a prompt with `{variables}`, such as
            "{product} on a {background} background".
        variables: The values of each template variable; every combination is
            generated, and named after its values.
        prefix: The folder, within the bucket folder, for this batch's images.
        width: Width of prompts that do not give one.
        height: Height of prompts that do not give one.
        max_concurrency: Generations in flight at once.
        allow_failures: Failed prompts tolerated before the run ends Failed.
        refresh_cache: Generate again even where a cached image exists (and pay).
        cache_expiration_days: How long generated images are served from the cache;
            None keeps them for good.
        public_base_url: Where the bucket is served publicly (a CDN), for the links
            in the run's artifacts; without it they are presigned URLs.
        link_expiry_hours: How long presigned links in the artifacts work.

    Returns:
        The `BatchReport`: stored images, failures, the manifest's key and the cost.
        Every good image is stored and the manifest written before the run fails
        for more than `allow_failures` failures.
    """
    logger = get_run_logger()
    creds = resolve_credentials(credentials)
    s3 = resolve_bucket(bucket)
    check_bucket_name(s3.bucket_name)
    folder = normalize_prefix(prefix)
    requests = _requests(prompts, template, variables, width, height, s3)
    for request in requests:
        creds.check_request(request)

    generate = generate_image.with_options(
        refresh_cache=refresh_cache,
        cache_expiration=timedelta(days=cache_expiration_days) if cache_expiration_days else None,
    )
    batch = _Batch(requests, creds)
    logger.info(
        "Generating %d images (%d distinct requests) into %s",
        len(requests),
        len(batch.groups),
        object_uri(s3, join_key(s3.bucket_folder, folder)),
    )

    progress = ProgressArtifact(total=len(requests))
    try:
        _generate_and_store(batch, generate, creds, s3, folder, max_concurrency, progress)
    finally:
        progress.close()

    report = batch.report()
    rows = batch.rows()
    report.manifest_key = manifest_key(s3.bucket_folder, folder, _run_label())
    report.manifest_uri = object_uri(s3, report.manifest_key)
    manifest = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    put_bytes(s3, report.manifest_key, manifest.encode(), "application/x-ndjson")
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
    width: int,
    height: int,
    bucket: S3Bucket,
) -> list[ImageRequest]:
    """The batch's requests, from a prompt set or a template; all checked, none paid for."""
    if (prompts is None) == (template is None):
        raise InvalidRequestError("Give either prompts or a template (with variables).")
    if template is not None:
        return expand_template(template, variables or {}, width=width, height=height)
    assert prompts is not None
    return load_prompts(prompts, width=width, height=height, read_uri=partial(read_uri, bucket))


def _generate_and_store(
    batch: _Batch,
    generate: Task[..., GeneratedImage],
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    folder: str,
    max_concurrency: int,
    progress: ProgressArtifact,
) -> None:
    """Keep `max_concurrency` generations in flight, and upload each image as it comes.

    Prefect's thread pool is unbounded, so the window is kept here: a new generation
    is submitted as one finishes, and uploads (cheap, and not the API's business)
    start at once.
    """
    events: queue.SimpleQueue[tuple[str, Any, PrefectFuture[Any]]] = queue.SimpleQueue()

    def watch(stage: str, tag: Any, future: PrefectFuture[Any]) -> None:
        future.add_done_callback(lambda done: events.put((stage, tag, done)))

    waiting = deque(batch.groups)
    in_flight = 0

    def submit_generations() -> None:
        nonlocal in_flight
        while waiting and in_flight < max_concurrency:
            key = waiting.popleft()
            request = batch.requests[batch.groups[key][0]]
            watch("generate", key, generate.submit(request, credentials))
            in_flight += 1

    submit_generations()
    while not batch.finished:
        stage, tag, future = events.get()
        outcome = future.result(raise_on_failure=False)
        if stage == "generate":
            in_flight -= 1
            if isinstance(outcome, GeneratedImage):
                batch.generated(tag, cached=future.state.name == "Cached")
                for index in batch.uploads(tag):
                    # wait_for only draws the edge in the run graph: `future` is done.
                    upload = upload_image.submit(
                        outcome,
                        bucket,
                        folder,
                        batch.requests[index],
                        wait_for=[future],
                        return_state=False,
                    )
                    watch("upload", index, upload)
            else:
                error = _exception(outcome)
                batch.generation_failed(tag, error)
                if getattr(error, "stops_batch", False) and waiting:
                    # Every other request would fail the same way, and may cost money.
                    batch.stop(error, not_attempted=list(waiting))
                    waiting.clear()
            submit_generations()
        elif isinstance(outcome, StoredImage):
            batch.stored(tag, outcome)
        else:
            batch.upload_failed(tag, _exception(outcome))
        progress.update(batch.done)
        progress_listeners.report(batch.done, len(batch.requests))


def _failure_message(batch: _Batch, report: BatchReport, allow_failures: int) -> str:
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


class _Batch:
    """The bookkeeping of one batch: which prompts share a generation, what became of each.

    Identical requests (same cache key) share one generation; each distinct name
    among them gets its own object.
    """

    def __init__(self, requests: list[ImageRequest], credentials: RapidAPICredentials) -> None:
        self.requests = requests
        self.price = credentials.price_per_image_usd
        self.key_of = [generation_cache_key(request, credentials) for request in requests]
        self.groups: dict[str, list[int]] = {}
        for index, key in enumerate(self.key_of):
            self.groups.setdefault(key, []).append(index)
        self.outcomes: dict[int, StoredImage | PromptFailure] = {}
        self.paid_keys: set[str] = set()
        self.cached_keys: set[str] = set()
        self.stopped_by: BaseException | None = None

    @property
    def done(self) -> int:
        return len(self.outcomes)

    @property
    def finished(self) -> bool:
        return self.done == len(self.requests)

    def generated(self, key: str, *, cached: bool) -> None:
        (self.cached_keys if cached else self.paid_keys).add(key)

    def uploads(self, key: str) -> list[int]:
        """The prompts of a group that need an object each: one per distinct name."""
        by_name: dict[str | None, int] = {}
        for index in self.groups[key]:
            by_name.setdefault(self.requests[index].name, index)
        return list(by_name.values())

    def stored(self, index: int, stored: StoredImage) -> None:
        for other in self._same_object(index):
            self.outcomes[other] = stored

    def generation_failed(self, key: str, error: BaseException) -> None:
        for index in self.groups[key]:
            self.outcomes[index] = self._failure(index, error, "generate")

    def stop(self, error: BaseException, not_attempted: list[str]) -> None:
        self.stopped_by = error
        for key in not_attempted:
            for index in self.groups[key]:
                self.outcomes[index] = self._failure(
                    index,
                    error,
                    "not attempted",
                    reason=f"Not attempted: the batch stopped after {type(error).__name__}.",
                )

    def upload_failed(self, index: int, error: BaseException) -> None:
        for other in self._same_object(index):
            self.outcomes[other] = self._failure(other, error, "upload")

    def report(self) -> BatchReport:
        ordered = [self.outcomes[i] for i in range(len(self.requests))]
        return BatchReport(
            images=[o for o in ordered if isinstance(o, StoredImage)],
            failures=[o for o in ordered if isinstance(o, PromptFailure)],
            generated=len(self.paid_keys),
            from_cache=len(self.cached_keys),
            cost_usd=round(len(self.paid_keys) * self.price, 6),
        )

    def rows(self) -> list[dict[str, Any]]:
        """One record per prompt, in the order given: for the manifest and the table."""
        rows = []
        for index, outcome in sorted(self.outcomes.items()):
            row: dict[str, Any] = {"index": index, **outcome.model_dump()}
            if isinstance(outcome, PromptFailure):
                row["status"] = "not attempted" if outcome.stage == "not attempted" else "failed"
            else:
                key = self.key_of[index]
                paid = key in self.paid_keys and self.groups[key][0] == index
                row.update(
                    status="stored",
                    cached=key in self.cached_keys,
                    cost_usd=self.price if paid else 0.0,
                )
            rows.append(row)
        return rows

    def _same_object(self, index: int) -> list[int]:
        """The prompts stored as one object with `index`: same request, same name."""
        name = self.requests[index].name
        return [i for i in self.groups[self.key_of[index]] if self.requests[i].name == name]

    def _failure(
        self, index: int, error: BaseException, stage: FailureStage, reason: str | None = None
    ) -> PromptFailure:
        request = self.requests[index]
        return PromptFailure(
            prompt=request.prompt,
            name=request.name,
            error=reason or str(error),
            error_type=type(error).__name__,
            stage=stage,
        )


def _exception(outcome: object) -> BaseException:
    return outcome if isinstance(outcome, BaseException) else RuntimeError(repr(outcome))


def _run_label() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{flow_run.name or 'local'}"
