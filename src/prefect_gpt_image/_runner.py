"""Running a prompt set: what the cache already holds, then a window of generations kept at the
API's limits, each image uploaded as it comes, and the rules that stop a run early.

`RunLedger` is the ledger (what became of each prompt, what it cost); `Runner` decides
what to send next and records what comes back. The flow only plans and publishes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

from prefect import Task
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from prefect_aws import S3Bucket

from prefect_gpt_image import _progress as progress_listeners
from prefect_gpt_image._artifacts import Link, ProgressArtifact
from prefect_gpt_image._batch_jobs import (
    BatchJobs,
    Collected,
    Progress,
    Unanswered,
    Waiting,
    in_batches,
    pointer_key,
    sending_lock_key,
)
from prefect_gpt_image._billing import run_budget, within_cap
from prefect_gpt_image._caching import (
    cache_store,
    ensure_kept,
    fallback_store,
    find_cached,
    is_fallback,
    remember,
    stored_keys,
)
from prefect_gpt_image._charges import NO_CHARGES
from prefect_gpt_image._ledger import RunLedger
from prefect_gpt_image._locking import held
from prefect_gpt_image._object_keys import join_key
from prefect_gpt_image._placement_plan import Campaign
from prefect_gpt_image._rendition_store import store_renditions
from prefect_gpt_image._retry_policy import call_with_retries
from prefect_gpt_image._storage import object_sizes, planned_record, store_image
from prefect_gpt_image.errors import (
    BatchNotDoneError,
    BudgetExceededError,
    ConfigurationError,
    GptImageError,
    StorageError,
)
from prefect_gpt_image.models import ApiLimits, GeneratedImage, StoredImage
from prefect_gpt_image.placement_table import Placement

if TYPE_CHECKING:
    from prefect_gpt_image._routes import OpenAIRoute, Route

SENDING_LOCK_SECONDS = 600.0
"""The longest a run waits for another to finish sending batches (or holds them)."""


class Runner:
    """Generates and stores the prompts of `ledger` that have no outcome yet.

    Prefect's thread pool is unbounded, so the runner keeps a window of submissions: a
    new generation is submitted as one finishes. In one process the throttle holds
    requests in flight to `max_concurrency`, so the window runs ahead of it by as much
    again, and the tasks' own work (download, checks, persisting) overlaps the API's;
    with workers in other processes (Dask) the window itself is the bound.
    """

    def __init__(
        self,
        ledger: RunLedger,
        generate: Task[..., GeneratedImage],
        routes: Sequence[Route],
        limits: ApiLimits,
        bucket: S3Bucket,
        folder: str,
        max_cost_usd: float | None,
        link: Link,
        *,
        campaign: Campaign | None = None,
    ) -> None:
        """`link` makes the URL a person opens for an object key, for the run's artifacts:
        made as each image is stored, while the API works, not all at the end.
        `campaign`: the placements every master is delivered at: each master's renditions
        are drawn and stored as it comes, beside its upload."""
        self.ledger = ledger
        self._campaign = campaign
        self._link = link
        self._links: dict[str, str] = {}
        self._generate = generate
        self._routes = list(routes)
        self._limits = limits
        self._bucket = bucket
        self._folder = folder
        self._max_cost_usd = max_cost_usd
        self._cache, self._fallback = cache_store(generate), fallback_store()
        self._cache_is_fallback = is_fallback(self._cache)
        self._uncached = {key for key in ledger.groups if not ledger.settled(key)}
        self._waiting: deque[str] = deque()
        self._in_flight: set[str] = set()
        self._events: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._logger = get_run_logger()  # the upload threads have no run context of their own
        context = FlowRunContext.get()
        self._in_process = context is not None and isinstance(
            context.task_runner, ThreadPoolTaskRunner
        )

    # --- plan ------------------------------------------------------------------------------

    def reuse_cached(self) -> None:
        """Find the requests already in the cache, and record at once those whose objects
        are in the bucket too: a re-run then costs a cache read per image, not a task run.
        One image is in memory at a time."""
        ledger, bucket = self.ledger, self._bucket
        fallback = None if self._cache_is_fallback else self._fallback
        in_bucket: dict[str, int] | None = None
        present = stored_keys(self._cache)
        for key in ledger.groups:
            if ledger.settled(key):  # refused before anything was sent
                continue
            keys = ledger.lookup_keys(key)
            if present is not None and fallback is None and present.isdisjoint(keys):
                continue  # not in the cache: no need to try reading it
            if (image := find_cached(self._cache, keys)) is None:
                if fallback is None or (image := find_cached(fallback, keys)) is None:
                    continue
                # Kept locally while the cache storage was down: back where the task looks.
                self._cache.write(image, key=key)
            self._uncached.discard(key)
            if in_bucket is None:
                in_bucket = self._object_sizes()
            stored = [
                (index, planned_record(variant, bucket, self._folder, ledger.requests[index]))
                for variant in image.variants()
                for index in ledger.uploads(key)
            ]
            if self._campaign is None and all(
                in_bucket.get(record.key) == record.size for _, record in stored
            ):  # with placements, the run finds its renditions (and sources) as it goes
                ledger.generated(key, image, cached=True)
                for index, record in stored:
                    ledger.stored(index, record)

    @property
    def new_generations(self) -> int:
        return len(self._uncached)

    @property
    def worst_case_usd(self) -> float:
        """The most the generations not in the cache can cost."""
        return round(sum(self.ledger.worst_case_usd[key] for key in self._uncached), 6)

    def check_budget(self) -> None:
        """Refuse, before anything is paid for, a run whose new generations could cost
        more than `max_cost_usd` at worst."""
        estimate = self.worst_case_usd
        if not within_cap(estimate, self._max_cost_usd):
            raise BudgetExceededError(
                f"This run needs {self.new_generations} new generations, up to "
                f"${estimate:.2f} at worst (auto quality priced as high), over "
                f"max_cost_usd=${self._max_cost_usd:.2f}. Nothing was generated: raise "
                "max_cost_usd or trim the prompts."
            )

    # --- run -------------------------------------------------------------------------------

    def run(self, progress: ProgressArtifact) -> None:
        """Keep the API at its limits, and upload each image as it comes."""
        ledger = self.ledger
        if not self._generate.refresh_cache:
            self._hold_back_batched()
        self._waiting.extend(key for key in ledger.groups if not ledger.settled(key))
        # Uploads run in the flow's own threads, not as task runs: a task run costs more CPU
        # than the upload itself, and the generation's task run already stands for the image.
        max_concurrency = self._limits.max_concurrency
        with ThreadPoolExecutor(max_concurrency, thread_name_prefix="upload") as uploads:
            self._submit_generations()
            while not ledger.finished:
                stage, tag, future = self._events.get()
                self._dispatch(stage, tag, future, uploads)
                self._report(progress)

    def _dispatch(self, stage: str, tag: Any, future: Any, uploads: ThreadPoolExecutor) -> None:
        """Record what a generation, an upload or a rendition came to."""
        if stage == "generate":
            self._in_flight.discard(tag)
            self._generation_done(tag, future, uploads)
            self._submit_generations()
        elif stage == "render":
            self._render_done(tag, future)
        else:
            self._upload_done(tag, future)

    def _hold_back_batched(self) -> None:
        """Fail, unpaid, the requests a batch-mode run sent (as `sent` rules): their batch
        answers them."""
        present = stored_keys(self._cache)
        candidates = {key: self.ledger.lookup_keys(key) for key in self._uncached}
        if present is not None:  # only those with a record: no need to try reading the rest
            candidates = {
                key: keys
                for key, keys in candidates.items()
                if not present.isdisjoint(map(pointer_key, keys))
            }
        for key, error in in_batches(self._cache, candidates).items():
            self.ledger.generation_failed(key, error, NO_CHARGES)
            self._uncached.discard(key)

    def run_batch_api(
        self,
        progress: ProgressArtifact,
        route: OpenAIRoute,
        *,
        wait_seconds: float,
        cancel: bool = False,
    ) -> None:
        """Send the requests through OpenAI's Batch API, at half price, and store what its
        batches answer as `run` stores what the API answers at once.

        A request already in a batch (an earlier run's, found by its cache key) is collected
        from it, never sent again. Batches still running after `wait_seconds` are left to a
        later run; `cancel` asks the API to stop the run's batches and sends nothing new.
        """
        ledger = self.ledger
        keys = [key for key in ledger.groups if not ledger.settled(key)]
        requests = {key: ledger.requests[ledger.groups[key][0]] for key in keys}
        jobs = BatchJobs(route, self._cache, requests, route.get_client().batch_image)
        self._send(jobs, route, cancel=cancel)
        self._logger.info(
            "Requests in OpenAI batches %s (%d created by this run); waiting up to %.0f s",
            ", ".join(jobs.batch_ids) or "(none)",
            len(jobs.created),
            wait_seconds,
        )
        max_concurrency = self._limits.max_concurrency
        # Images read ahead of their uploads: the output file is read one line at a time.
        slots = threading.BoundedSemaphore(2 * max_concurrency)
        collector = threading.Thread(
            target=self._collect,
            args=(jobs, time.monotonic() + wait_seconds, slots),
            name="batch-collector",
            daemon=True,
        )
        in_batches = 0
        with ThreadPoolExecutor(max_concurrency, thread_name_prefix="upload") as uploads:
            collector.start()
            while not ledger.finished:
                stage, tag, payload = self._events.get()
                if isinstance(payload, Collected):
                    # What this run paid to refresh replaces the cached image; nothing else.
                    replace = bool(self._generate.refresh_cache) and payload.asked
                    keep = partial(self._keep, written=False, replace=replace)
                    futures = [uploads.submit(keep, tag, payload.image)]
                    if payload.asked and not ledger.settled(tag):
                        futures += self._generated(tag, payload.image, uploads, cached=False)
                    _when_all_done(futures, slots.release)
                elif isinstance(payload, Unanswered):
                    ledger.generation_failed(tag, payload.error, payload.error.charges)
                elif isinstance(payload, Waiting):
                    ledger.wait(tag, payload.batch_id)
                elif isinstance(payload, Progress):
                    in_batches = payload.completed
                elif stage in ("generate", "render"):  # a source of renditions, made at once
                    self._dispatch(stage, tag, payload, uploads)
                elif stage == "collector failed":
                    self._logger.warning(
                        "Stopped collecting the batches (%s); the next run collects them.",
                        payload,
                    )
                    for key in keys:
                        if not ledger.settled(key) and (batch_id := jobs.batch_of(key)):
                            ledger.wait(key, batch_id)
                else:
                    self._upload_done(tag, payload)
                self._report(progress, in_batches)

    def _send(self, jobs: BatchJobs, route: OpenAIRoute, *, cancel: bool) -> None:
        """Find the batches the requests are in, and send the rest (or, to `cancel`, cancel
        the batches and send nothing). One run at a time finds and sends, under the cache's
        own lock manager: a run that starts while another sends the same prompts waits, then
        finds them sent."""
        lock_manager = getattr(self._generate.cache_policy, "lock_manager", None)
        with held(lock_manager, sending_lock_key(route), SENDING_LOCK_SECONDS) as sending:
            if not sending:
                raise ConfigurationError(
                    f"Another run has been sending batches through {route.route_name} for "
                    f"{SENDING_LOCK_SECONDS / 60:.0f} minutes: nothing was sent. Run again "
                    "once it is done; it finds what that run sent."
                )
            refresh = bool(self._generate.refresh_cache) and not cancel  # pay again
            unsent = jobs.attach(create=not cancel, refresh=refresh)
            error: GptImageError | None = None
            if cancel:
                jobs.cancel()
                error = BatchNotDoneError("Not sent: batch.cancel was set.")
            elif unsent:
                try:
                    jobs.submit(unsent)
                except GptImageError as exc:  # what was sent is collected all the same
                    self._logger.error("Could not send every request: %s", exc)
                    error = exc
        for key in unsent:
            if error is not None and jobs.batch_of(key) is None:
                self.ledger.generation_failed(key, error, NO_CHARGES)

    def _collect(self, jobs: BatchJobs, deadline: float, slots: threading.BoundedSemaphore) -> None:
        """The collector thread: the batches' answers, as events for the run loop."""
        try:
            for event in jobs.collect(deadline):
                if isinstance(event, Collected):
                    slots.acquire()
                key = event.key if not isinstance(event, Progress) else ""
                self._events.put(("batch", key, event))
        except Exception as exc:
            self._events.put(("collector failed", "", exc))

    def _upload_done(self, index: int, future: Future[tuple[StoredImage, bool]]) -> None:
        if (error := future.exception()) is None:
            self.ledger.stored(index, future.result()[0])
        else:
            self.ledger.upload_failed(index, error)

    def _report(self, progress: ProgressArtifact, in_batches: int = 0) -> None:
        """Progress: prompts done, and requests OpenAI's batches have answered meanwhile."""
        progress.update(self.ledger.done + in_batches)
        progress_listeners.report(self.ledger.done, self.ledger.prompt_count)

    def _submit_generations(self) -> None:
        max_concurrency = self._limits.max_concurrency
        window = 2 * max_concurrency if self._in_process else max_concurrency
        while self._waiting and len(self._in_flight) < window:
            key = self._waiting[0]
            if not self._within_budget(key):
                spent = self.ledger.spent_usd
                self._stop(
                    BudgetExceededError(
                        f"The spend reached max_cost_usd=${self._max_cost_usd:.2f} "
                        f"(${spent:.2f} spent, more in flight)."
                    )
                )
                return
            self._waiting.popleft()
            request = self.ledger.requests[self.ledger.groups[key][0]]
            # The bucket reads an edit's s3:// inputs with its own credentials.
            settings: tuple[Any, ...] = (self._routes, self._limits, self._bucket)
            if self._in_process:
                # Blocks hold no futures, so Prefect need not walk them; other task runners
                # (Dask) ship quoted arguments without unquoting them.
                settings = tuple(quote(setting) for setting in settings)
            self._watch("generate", key, self._generate.submit(request, *settings))
            self._in_flight.add(key)

    def _within_budget(self, key: str) -> bool:
        """Whether `key`'s worst case fits beside what is spent and what is in flight.
        Each attempt is held to the cap too (`budget`); this holds workers in other
        processes, which that ledger cannot see."""
        if self._max_cost_usd is None or key not in self._uncached:
            return True
        worst = self.ledger.worst_case_usd
        in_flight = sum(worst[k] for k in self._in_flight & self._uncached)
        committed = self.ledger.spent_usd + worst[key] + in_flight
        return within_cap(committed, self._max_cost_usd)

    def _generation_done(
        self, key: str, future: PrefectFuture[GeneratedImage], uploads: ThreadPoolExecutor
    ) -> None:
        ledger = self.ledger
        try:
            outcome: object = future.result(raise_on_failure=False)
        except Exception as exc:  # the runner lost the task: a Dask worker died, say
            outcome = exc
        if not isinstance(outcome, GeneratedImage):
            error = outcome if isinstance(outcome, BaseException) else RuntimeError(repr(outcome))
            # Every attempt's charges, where this process saw them; else the last attempt's.
            charges = run_budget().charges_of(str(future.task_run_id))
            if charges == NO_CHARGES:
                charges = getattr(error, "charges", NO_CHARGES)
            ledger.generation_failed(key, error, charges)
            if getattr(error, "stops_run", False):
                # Every other request would fail the same way, and may cost money.
                self._stop(error)
            return
        cached = future.state.name == "Cached"
        if not cached:  # paid for: it must be kept somewhere before it is reported
            uploads.submit(self._keep, key, outcome)
        self._generated(key, outcome, uploads, cached=cached)

    def _generated(
        self, key: str, image: GeneratedImage, uploads: ThreadPoolExecutor, *, cached: bool
    ) -> list[Future[Any]]:
        """Record `key`'s image, and store an object for each of its prompts (with their
        renditions); returns the uploads."""
        ledger = self.ledger
        ledger.generated(key, image, cached=cached)
        if (source := ledger.source_of(key)) is not None:
            master_key, placements = source
            renders = [
                self._render(image, placements, index, master_key, uploads)
                for index in ledger.uploads(key)
            ]
            ledger.source_done(key)
            return renders
        futures: list[Future[Any]] = []
        for variant in image.variants():
            for index in ledger.uploads(key):
                store = partial(
                    store_image,
                    variant,
                    self._bucket,
                    self._folder,
                    ledger.requests[index],
                    check_existing=cached,
                )
                futures.append(uploads.submit(self._store, store))
                self._watch("upload", index, futures[-1])
        if self._campaign is not None:
            futures += self._adapt(key, image, uploads)
        return futures

    # --- placements ------------------------------------------------------------------------

    def _adapt(
        self, key: str, image: GeneratedImage, uploads: ThreadPoolExecutor
    ) -> list[Future[Any]]:
        """Draw the master's renditions, and queue the sources its other placements need
        (sent at once, whatever the run's mode)."""
        assert self._campaign is not None
        ledger = self.ledger
        master = ledger.requests[ledger.groups[key][0]]
        placements = self._campaign.master_placements(master)
        futures = [
            self._render(image, placements, index, key, uploads) for index in ledger.uploads(key)
        ]
        for request, served in self._campaign.derived(master, image):
            source_key = ledger.add_source(request, key, served)
            self._uncached.add(source_key)
            self._waiting.append(source_key)
        self._submit_generations()
        return futures

    def _render(
        self,
        image: GeneratedImage,
        placements: tuple[Placement, ...],
        index: int,
        master_key: str,
        uploads: ThreadPoolExecutor,
    ) -> Future[Any]:
        """Store `image`'s renditions for `placements`, for the prompt at `index`."""
        assert self._campaign is not None
        self.ledger.expect_renditions(len(placements))
        job = partial(
            store_renditions,
            image,
            placements,
            self._bucket,
            self._folder,
            self.ledger.requests[index],
            master_sha256=self.ledger.master_sha256[master_key],
            adapt=self._campaign.adapt,
        )
        future = uploads.submit(self._linked, job)
        self._watch("render", (index, placements), future)
        return future

    def _linked(
        self, job: Callable[[], list[StoredImage | GptImageError]]
    ) -> list[StoredImage | GptImageError]:
        outcomes = job()
        for outcome in outcomes:
            if isinstance(outcome, StoredImage):
                self._make_link(outcome.key)
        return outcomes

    def _render_done(
        self,
        tag: tuple[int, tuple[Placement, ...]],
        future: Future[list[StoredImage | GptImageError]],
    ) -> None:
        index, placements = tag
        error = future.exception()
        outcomes = future.result() if error is None else [error] * len(placements)
        for placement, outcome in zip(placements, outcomes, strict=True):
            self.ledger.rendered(index, placement.name, outcome)

    def _store(self, store: Callable[[], tuple[StoredImage, bool]]) -> tuple[StoredImage, bool]:
        stored = call_with_retries(store)
        self._make_link(stored[0].key)
        return stored

    def _make_link(self, key: str) -> None:
        try:
            self._links[key] = self._link(key)
        except Exception as exc:  # never fail a stored image over its link: publishing retries
            self._logger.debug("Could not make the link of %s yet: %s", key, exc)

    def link(self, key: str) -> str:
        """The URL a person opens for an object key."""
        return self._links.get(key) or self._link(key)

    def _stop(self, error: BaseException) -> None:
        if self._waiting:
            self.ledger.stop(error, not_attempted=list(self._waiting))
            self._waiting.clear()

    def _watch(self, stage: str, tag: Any, future: PrefectFuture[Any] | Future[Any]) -> None:
        future.add_done_callback(lambda done: self._events.put((stage, tag, done)))

    def _keep(
        self, key: str, image: GeneratedImage, *, written: bool = True, replace: bool = False
    ) -> None:
        """Make sure the cache holds a paid image: the one its task run `written`, or one
        the Batch API made, which no task run wrote (and which `replace`s a different one
        cached already only when asked)."""
        if written and self._cache_is_fallback:
            return  # the task run kept it where the fallback would: there is no other place
        if written:
            kept = ensure_kept(self._cache, self._fallback, key, image)
        else:
            expiration = self._generate.cache_expiration
            kept = remember(
                self._cache, key, image, expiration, fallback=self._fallback, replace=replace
            )
        if not kept:
            self._logger.warning(
                "The cache storage could not keep the image of %r; it is kept in local "
                "result storage instead, so the next run on this machine does not pay for "
                "it again.",
                image.request.label,
            )

    def _object_sizes(self) -> dict[str, int]:
        """The bucket's objects under the run's folder; none if it cannot be listed, so
        that the uploads (which retry, and say what is wrong) run instead."""
        prefix = join_key(self._bucket.bucket_folder, self._folder)
        try:
            return object_sizes(self._bucket, prefix + "/" if prefix else "")
        except StorageError as exc:
            self._logger.warning("Could not list %s (%s); uploading every image", prefix, exc)
            return {}


def _when_all_done(futures: Sequence[Future[Any]], callback: Callable[[], object]) -> None:
    """Call `callback` once every one of `futures` is done."""
    left = len(futures)
    lock = threading.Lock()

    def one_done(_: Future[Any]) -> None:
        nonlocal left
        with lock:
            left -= 1
            last = left == 0
        if last:
            callback()

    for future in futures:
        future.add_done_callback(one_done)
