"""The flow: a prompt set in, every good image in the bucket, a manifest beside them.

It reads top to bottom: resolve the inputs, plan (check everything that can be checked
before paying, and what the cache already holds), run (`_runner`), publish (the
manifest and the run's artifacts), and, with `review`, wait for a person's decision and
publish what was approved (`_review`).
"""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Annotated

from prefect import Task, flow
from prefect.logging import get_run_logger
from prefect_aws import S3Bucket
from pydantic import Field

from prefect_gpt_image._artifacts import Link, ProgressArtifact, publish_results
from prefect_gpt_image._billing import run_budget
from prefect_gpt_image._caching import with_locks_in
from prefect_gpt_image._edit_inputs import InputRef, expand_inputs
from prefect_gpt_image._edits import check_edits
from prefect_gpt_image._form_schema import EmptyInForm
from prefect_gpt_image._image_sizes import parse_size
from prefect_gpt_image._ledger import RunLedger
from prefect_gpt_image._manifest import write_manifest
from prefect_gpt_image._object_keys import check_bucket_name, join_key, normalize_prefix
from prefect_gpt_image._placement_plan import Campaign
from prefect_gpt_image._preflight import (
    check_global_limits,
    check_redis,
    check_storage,
    saved_block,
)
from prefect_gpt_image._prompt_sets import PromptSet, expand_template, read_prompt_set
from prefect_gpt_image._review import Review, check_review
from prefect_gpt_image._routes import batch_api_route, serving_routes
from prefect_gpt_image._run_story import tell_outcome, tell_plan
from prefect_gpt_image._runner import Runner
from prefect_gpt_image._storage import object_link, object_uri, read_uri
from prefect_gpt_image.blocks._loading import Routes, resolve_bucket, resolve_routes
from prefect_gpt_image.errors import InvalidRequestError, RunFailedError
from prefect_gpt_image.models import ApiLimits, GeneratedImage, ImageRequest, RunReport
from prefect_gpt_image.options import (
    NO_REVIEW,
    SYNCHRONOUS,
    BatchOptions,
    CacheOptions,
    EditOptions,
    ImageOptions,
    LinkOptions,
    PromptTemplate,
    ReviewOptions,
)
from prefect_gpt_image.placement_table import Adapt, Placement, resolve_placements
from prefect_gpt_image.settings import with_environment
from prefect_gpt_image.tasks.generate import generate_image

if TYPE_CHECKING:
    from prefect_gpt_image._routes import OpenAIRoute, Route


@flow(name="generate-images")
def generate_images(
    prompts: list[str | ImageRequest] | str | PromptTemplate,
    *,
    image: ImageOptions = ImageOptions(),
    placements: list[str | Placement] = [],  # noqa: B006 (Prefect validates a copy)
    adapt: Adapt = "crop",
    edit: EditOptions = EditOptions(),
    max_cost_usd: Annotated[float | None, Field(ge=0), EmptyInForm()] = None,
    allow_failures: Annotated[int, Field(ge=0)] = 0,
    batch: BatchOptions = SYNCHRONOUS,
    review: ReviewOptions = NO_REVIEW,
    bucket: S3Bucket | str,
    prefix: str = "",
    credentials: Annotated[Routes, EmptyInForm()] = None,
    limits: ApiLimits = ApiLimits(),
    cache: CacheOptions = CacheOptions(),
    links: LinkOptions = LinkOptions(),
) -> RunReport:
    """Generate an image for every prompt and store each one in the bucket.

    Args:
        prompts: Prompts or `ImageRequest`s; the path or `s3://` URI of a `.txt` (one
            prompt a line), `.csv` (a `prompt` column) or `.jsonl` file; or a
            `PromptTemplate`, whose every combination of values is a prompt.
        image: What every image looks like (size, quality, n, format...), for prompts
            that do not say otherwise.
        placements: Where the images run, one item each: a preset (meta-feed-square,
            meta-feed-portrait, meta-stories, meta-reels, meta-link, linkedin-landscape,
            linkedin-square, google-display-landscape, google-display-square,
            display-medium-rectangle, display-leaderboard, display-half-page,
            display-wide-skyscraper, display-billboard, display-mobile-banner), a size such
            as 1200x628, or a `Placement`. Each prompt's image (its master) is then delivered
            at each placement's exact pixels, format and file-size limit, beside it.
        adapt: How a master becomes a placement of another shape: `"crop"` cuts it (one
            paid image per prompt); `"extend"` extends its canvas with an edit, once per
            other aspect; `"generate"` makes an image per other aspect.
        edit: Images to edit with every prompt, instead of generating.
        max_cost_usd: A hard cap: refuse to start a run whose uncached part could cost
            more, and send no call, first or retry, whose worst case could pass it.
        allow_failures: Failed prompts tolerated before the run ends Failed.
        batch: Through OpenAI's Batch API, at half the price, answered within 24 hours
            (`BatchOptions()`); by default every image is generated now.
        review: A person approves each image before it is published
            (`ReviewOptions()`): the run waits for a decision in Prefect's UI, copies what
            was approved to the publish folder, and edits what was rejected with a note.
            By default nothing is published, and the run does not wait.
        bucket: An `S3Bucket` block, a saved block's name, or `s3://bucket/folder`
            (with the environment's AWS credentials).
        prefix: The folder, within the bucket folder, for this run's images.
        credentials: The route to the model: a `RapidAPICredentials` or
            `OpenAICredentials` block or a saved block's name, or an ordered list of
            them (a route that retired the model, rejects the key or ran out of quota
            is dropped, and the next takes over). Without it, the `RAPIDAPI_KEY`
            environment variable is the key to RapidAPI's route.
        limits: How busy the run may keep the API: the plan's limits.
        cache: The generation cache: refresh, expiry, shared storage and its locks.
        links: The links in the run's artifacts.

    `limits`, `cache` and `links` are what a team sets once: a field a run leaves at its
    default takes the environment's `GPT_IMAGE_*` setting, if any (see
    `prefect_gpt_image.settings`).

    Returns:
        The `RunReport`: stored images, failures, the manifest's key, images generated
        and from the cache, and the dollars spent. Every good image is stored and the
        manifest written before the run fails for more than `allow_failures` failures.

    Example:
        Generate a template's every combination into a saved bucket, in high quality,
        through OpenAI with RapidAPI as the fallback, for at most five dollars:
        ```python
        from prefect_gpt_image import PromptTemplate, generate_images

        report = generate_images(
            PromptTemplate(
                template="a {product} on a {background} background",
                variables={"product": ["mug", "tote bag"], "background": ["white", "oak"]},
            ),
            image={"quality": "high"},
            bucket="BLOCK_NAME",
            credentials=["openai-gpt-image", "gpt-image-credentials"],
            prefix="spring-campaign",
            max_cost_usd=5,
        )
        print(report.summary())
        ```
    """
    logger = get_run_logger()
    # Resolve: the options, the routes, the bucket and every request, each checked on every
    # route it may take.
    limits = with_environment(limits)
    cache = with_environment(cache)
    links = with_environment(links)
    routes = resolve_routes(credentials)
    s3 = resolve_bucket(bucket)
    check_bucket_name(s3.bucket_name)
    folder = normalize_prefix(prefix)
    prompt_set = _prompt_set(prompts, image, s3, edit.input_roots)
    requests, refused = prompt_set.requests, prompt_set.refused
    if edit.images is not None:
        requests, refused = _edits_of(prompt_set, expand_inputs(edit.images, bucket=s3), edit)
    requests, refused = check_edits(requests, bucket=s3, refused=refused)
    batch_route = batch_api_route(routes, requests) if batch.enabled else None
    first_routes: list[Route] = routes if batch_route is None else [batch_route]
    campaign = _campaign(placements, adapt, first_routes, image)
    requests = _checked(requests, campaign, first_routes)
    cache_bucket = saved_block(resolve_bucket(cache.storage)) if cache.storage else None
    generate = _generation_task(cache, cache_bucket)

    # Plan: what would fail after paying fails now; what is cached is not sent again.
    check_global_limits(limits)
    check_storage(s3, folder, cache_bucket)
    if review.enabled:
        check_review(review, routes)
    run_budget().max_usd = max_cost_usd  # every paid attempt, retries too, is held to it
    link = partial(
        object_link,
        s3,
        public_base_url=links.public_base_url,
        expires_in=int(links.expiry_hours * 3600),
    )
    production = _Production(
        generate, routes, limits, s3, folder, max_cost_usd, link, campaign, cache.refresh
    )

    # Run.
    ledger = production.run(requests, refused, batch=batch, batch_route=batch_route)

    # Publish: the manifest, the table and the gallery, then the verdict.
    report = ledger.report()
    rows = ledger.rows()
    write_manifest(s3, folder, report, rows)
    tell_outcome(logger, report)
    zones = campaign.safe_zones() if campaign else None
    publish_results(rows, report, link, zones, review=review.enabled)
    if ledger.failed(report, allow_failures):
        raise RunFailedError(ledger.failure_message(report, allow_failures), report)

    # Review: what a person approves is published; what they reject with a note is edited
    # for the next round.
    if review.enabled:
        report = Review(review, s3, folder, link, zones, production.revise).run(report, rows)
    return report


class _Production:
    """A run's settings for making images: the first round's, and each review round's."""

    def __init__(
        self,
        generate: Task[..., GeneratedImage],
        routes: list[Route],
        limits: ApiLimits,
        s3: S3Bucket,
        folder: str,
        max_cost_usd: float | None,
        link: Link,
        campaign: Campaign | None,
        refresh: bool,
    ) -> None:
        self.generate, self.routes, self.limits = generate, routes, limits
        self.s3, self.folder, self.max_cost_usd, self.link = s3, folder, max_cost_usd, link
        self.campaign, self.refresh = campaign, refresh

    def run(
        self,
        requests: list[ImageRequest],
        refused: dict[int, InvalidRequestError],
        *,
        batch: BatchOptions = SYNCHRONOUS,
        batch_route: OpenAIRoute | None = None,
    ) -> RunLedger:
        """Make and store `requests`' images, with what the cache holds already unpaid."""
        routes = self.routes if batch_route is None else [batch_route]  # its Batch API alone
        ledger = RunLedger(
            requests, routes, refused, batch_api=batch.enabled, campaign=self.campaign
        )
        runner = Runner(
            ledger,
            self.generate,
            routes,
            self.limits,
            self.s3,
            self.folder,
            self.max_cost_usd,
            self.link,
            campaign=self.campaign,
        )
        if not self.refresh:
            runner.reuse_cached()
        runner.check_budget()
        folder_uri = object_uri(self.s3, join_key(self.s3.bucket_folder, self.folder))
        tell_plan(get_run_logger(), ledger, runner, folder_uri)
        progress = ProgressArtifact(total=len(requests))
        try:
            progress.update(ledger.done)
            if batch_route is not None:
                wait_seconds = batch.wait_minutes * 60
                runner.run_batch_api(
                    progress, batch_route, wait_seconds=wait_seconds, cancel=batch.cancel
                )
            else:
                runner.run(progress)
        finally:
            progress.close()
        return ledger

    def revise(self, revisions: list[ImageRequest]) -> RunLedger:
        """A review round's edits, through the synchronous routes: checked, then made."""
        requests, _ = check_edits(revisions, bucket=self.s3)
        return self.run(_checked(requests, self.campaign, self.routes), {})


def _checked(
    requests: list[ImageRequest], campaign: Campaign | None, routes: list[Route]
) -> list[ImageRequest]:
    """`requests` as masters of the campaign, if any, each valid on every route it may take
    (its extensions and extra generations too): checked before anything is paid."""
    if campaign is not None:
        requests = campaign.check(requests)
    for request in requests:
        for route in serving_routes(request, routes):
            route.check_request(request)
    return requests


def _prompt_set(
    prompts: list[str | ImageRequest] | str | PromptTemplate,
    image: ImageOptions,
    bucket: S3Bucket,
    input_roots: list[str],
) -> PromptSet:
    """The run's requests, from a prompt set or a template; all checked, none paid for."""
    defaults = image.request_fields()
    if isinstance(prompts, PromptTemplate):
        return PromptSet(expand_template(prompts.template, prompts.variables, defaults=defaults))
    return read_prompt_set(
        prompts, defaults=defaults, read_uri=partial(read_uri, bucket), input_roots=input_roots
    )


def _campaign(
    placements: list[str | Placement],
    adapt: Adapt,
    routes: list[Route],
    image: ImageOptions,
) -> Campaign | None:
    """The run's placements, resolved; None without any. A size the run gives is every
    master's; else each master's is chosen to serve the placements."""
    resolved = resolve_placements(placements)
    if not resolved:
        return None
    master_size = parse_size(image.size) if "size" in image.given() else None
    return Campaign(resolved, adapt, routes, master_size)


def _edits_of(
    prompt_set: PromptSet, inputs: list[InputRef], edit: EditOptions
) -> tuple[list[ImageRequest], dict[int, InvalidRequestError]]:
    """Every input edited with every prompt, but for prompts that name their own inputs;
    and the refused prompts (all of which name their own), at their new positions."""
    if not inputs:
        raise InvalidRequestError("edit.images names no image to edit.")
    edits: list[ImageRequest] = []
    refused: dict[int, InvalidRequestError] = {}
    for index, request in enumerate(prompt_set.requests):
        if request.is_edit:
            if index in prompt_set.refused:
                refused[len(edits)] = prompt_set.refused[index]
            edits.append(request)
            continue
        fields = {
            "mask": edit.mask,
            "input_fidelity": edit.input_fidelity or request.input_fidelity,
        }
        edits += [request.model_copy(update={"images": (ref,), **fields}) for ref in inputs]
    return edits, refused


def _generation_task(
    cache: CacheOptions, cache_bucket: S3Bucket | None
) -> Task[..., GeneratedImage]:
    """`generate_image` with this run's cache options."""
    expiration = timedelta(days=cache.expiration_days) if cache.expiration_days else None
    generate = generate_image.with_options(refresh_cache=cache.refresh, cache_expiration=expiration)
    if cache_bucket is not None:
        generate = generate.with_options(result_storage=cache_bucket)
    if cache.redis_lock_url is not None:
        check_redis(cache.redis_lock_url)
        generate = generate.with_options(
            cache_policy=with_locks_in(generate.cache_policy, cache.redis_lock_url)
        )
    return generate
