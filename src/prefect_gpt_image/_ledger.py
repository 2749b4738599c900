"""The bookkeeping of one run: which prompts share a generation, what became of each, and
what it cost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from prefect_gpt_image._billing import synchronous_cost, worst_case_over_routes
from prefect_gpt_image._caching import combined_key, keys_by_route, lookup_keys
from prefect_gpt_image._charges import Charges
from prefect_gpt_image.models import (
    FailureStage,
    GeneratedImage,
    ImageRequest,
    PromptFailure,
    RunReport,
    StoredImage,
    WaitingPrompt,
)

if TYPE_CHECKING:
    from prefect_gpt_image._placement_plan import Campaign
    from prefect_gpt_image._routes import Route
    from prefect_gpt_image.placement_table import Placement

FAILURES_LISTED = 20
"""How many failures the flow's failure message, and the run's log, spell out."""


def failure_lines(failures: Sequence[PromptFailure]) -> tuple[list[str], int]:
    """The first `FAILURES_LISTED` failures, one line each (its prompt, its name, its
    error), and how many more there are: a run of thousands stays readable."""
    lines = []
    for failure in failures[:FAILURES_LISTED]:
        parts = [failure.name] if failure.name and failure.name != failure.prompt else []
        parts += [f"placement {failure.placement}"] if failure.placement else []
        named = f" ({', '.join(parts)})" if parts else ""
        lines.append(f"{failure.prompt[:80]!r}{named}: {failure.error}")
    return lines, max(0, len(failures) - FAILURES_LISTED)


class RunLedger:
    """Identical requests (same cache key) share one generation; each distinct name among
    them gets its own object, and each image of an `n` above one too. Indexes are
    positions in the prompt set; keys are cache keys.

    With placements, each prompt's object is its master, and its renditions are recorded
    under its index. An image a master's renditions are cut from that is not the master
    (an extension, or a generation at another aspect) is a *source*: a request added
    after the prompt set, with its own key and cost, whose objects are the renditions.
    """

    def __init__(
        self,
        requests: list[ImageRequest],
        routes: Sequence[Route],
        refused: Mapping[int, BaseException] | None = None,
        *,
        batch_api: bool = False,
        campaign: Campaign | None = None,
    ) -> None:
        """`refused`: requests that fail before anything is sent (an edit whose input is
        missing, say), by position; each is a group of its own, settled at once.
        `batch_api`: the requests go through OpenAI's Batch API, at its price.
        `campaign`: the placements each request is delivered at, and how; the requests are
        then masters, each priced with the sources its renditions need."""
        refused = refused or {}
        self.requests = list(requests)
        self.prompt_count = len(requests)
        self.refused_count = len(refused)
        self.routes = routes
        self._route_keys: dict[str, list[str]] = {}
        """Each group's keys through each of its routes, which say where it may be cached."""
        self.key_of = [
            f"refused-{index}" if index in refused else self._key(request)
            for index, request in enumerate(requests)
        ]
        self.groups: dict[str, list[int]] = {}
        for index, key in enumerate(self.key_of):
            self.groups.setdefault(key, []).append(index)
        price = (
            partial(campaign.worst_case_usd, batch_api=batch_api)
            if campaign is not None
            else partial(worst_case_over_routes, routes=routes, batch=batch_api)
        )
        self.worst_case_usd = {
            key: 0.0 if indexes[0] in refused else price(requests[indexes[0]])
            for key, indexes in self.groups.items()
        }
        """The most each generation can cost, on whichever route serves it."""
        self.outcomes: dict[int, list[StoredImage] | PromptFailure] = {}
        self._variants: dict[int, dict[int, StoredImage]] = {}
        self._expected: dict[int, int] = {}
        self.paid_keys: set[str] = set()
        self.cached_keys: set[str] = set()
        self.charged: dict[str, float] = {}
        """USD the API charged, by key: a generation, and any broken answers."""
        self.possibly_charged: dict[str, float] = {}
        """USD that calls which timed out after they were sent may have cost, by key."""
        self.batch_api = batch_api
        self.waiting: dict[int, str] = {}
        """Prompts whose OpenAI batch was still running when the run stopped waiting: the
        batch's id, by position."""
        self.stopped_by: BaseException | None = None
        self.master_sha256: dict[str, str] = {}
        """The SHA-256 of each master's image, by key."""
        self.sources: dict[str, tuple[str, tuple[Placement, ...]]] = {}
        """Each source's master key and the placements cut from it, by the source's key."""
        self.renditions: dict[int, dict[str, StoredImage | PromptFailure]] = {}
        """Each prompt's renditions (or why one failed), by placement name."""
        self.campaign = campaign
        self.placement_order = {
            placement.name: order
            for order, placement in enumerate(campaign.placements if campaign else ())
        }
        self._renditions_pending = 0
        self._sources_done = 0
        for index, error in refused.items():
            self.outcomes[index] = self._failure(index, error, "check")

    @property
    def done(self) -> int:
        """Prompts with an outcome."""
        return len(self.outcomes) - self._sources_done

    @property
    def finished(self) -> bool:
        """Whether every prompt (and source) has an outcome, or waits in a batch for a later
        run, and every rendition begun is recorded."""
        settled = len(self.outcomes) + len(self.waiting) == len(self.requests)
        return settled and not self._renditions_pending

    @property
    def spent_usd(self) -> float:
        return round(sum(self.charged.values()), 6)

    def lookup_keys(self, key: str) -> list[str]:
        """Where a group's image may be cached: its key, or any of its routes' keys."""
        return lookup_keys(self._route_keys[key])

    def _key(self, request: ImageRequest) -> str:
        """`request`'s cache key, its routes' own keys kept for `lookup_keys`."""
        route_keys = keys_by_route(request, self.routes)
        key = combined_key(route_keys)
        self._route_keys.setdefault(key, route_keys)
        return key

    def settled(self, key: str) -> bool:
        """Whether every prompt of a group has an outcome (recorded from the cache, say)."""
        return all(index in self.outcomes for index in self.groups[key])

    def generated(self, key: str, image: GeneratedImage, *, cached: bool) -> None:
        if key not in self.sources:
            self.master_sha256[key] = image.sha256
        if cached:
            self.cached_keys.add(key)
        else:
            self.paid_keys.add(key)
            self.charged[key] = image.cost_usd
            self.possibly_charged[key] = image.possibly_charged_usd
        for index in self.groups[key]:
            self._expected[index] = image.image_count

    def uploads(self, key: str) -> list[int]:
        """The prompts of a group that need an object each: one per distinct name. For a
        source, the prompts of its master that need renditions each."""
        if key in self.sources:
            return self.uploads(self.sources[key][0])
        by_name: dict[str | None, int] = {}
        for index in self.groups[key]:
            by_name.setdefault(self.requests[index].name, index)
        return list(by_name.values())

    # --- placements ------------------------------------------------------------------------

    def add_source(
        self, request: ImageRequest, master_key: str, placements: tuple[Placement, ...]
    ) -> str:
        """Add a source of `master_key`'s renditions; returns its key. It is sent through
        the synchronous API whatever the run's mode, and priced so."""
        key = self._key(request)
        index = len(self.requests)
        self.requests.append(request)
        self.key_of.append(key)
        self.groups.setdefault(key, []).append(index)
        self.worst_case_usd.setdefault(key, worst_case_over_routes(request, self.routes))
        self.sources[key] = (master_key, placements)
        return key

    def source_of(self, key: str) -> tuple[str, tuple[Placement, ...]] | None:
        """A source's master key and placements; None for a master."""
        return self.sources.get(key)

    def expect_renditions(self, count: int) -> None:
        """Renditions begun: the run is not finished until each is recorded."""
        self._renditions_pending += count

    def rendered(self, index: int, placement: str, outcome: StoredImage | BaseException) -> None:
        """Record a rendition begun with `expect_renditions`: stored, or why not."""
        self._renditions_pending -= 1
        self._rendition(index, placement, outcome, "render")

    def source_done(self, key: str, error: BaseException | None = None) -> None:
        """A source's generation is over: its renditions are begun, or fail with `error`."""
        _, placements = self.sources[key]
        for index in self.groups[key]:
            if index not in self.outcomes:
                self.outcomes[index] = []
                self._sources_done += 1
        if error is None:
            return
        stage: FailureStage = "not attempted" if self.stopped_by is error else "generate"
        for concept in self.uploads(key):
            for placement in placements:
                self._rendition(concept, placement.name, error, stage)

    def _rendition(
        self,
        index: int,
        placement: str,
        outcome: StoredImage | BaseException,
        stage: FailureStage,
    ) -> None:
        for other in self._same_object(index):
            if isinstance(outcome, StoredImage):
                record: StoredImage | PromptFailure = outcome
            else:
                record = self._failure(other, outcome, stage).model_copy(
                    update={"placement": placement}
                )
            self.renditions.setdefault(other, {})[placement] = record

    def _renditions_of(self, index: int) -> list[StoredImage | PromptFailure]:
        """A prompt's renditions, in the order its placements were given."""
        made = self.renditions.get(index, {})
        return [made[name] for name in sorted(made, key=lambda n: self.placement_order.get(n, 0))]

    def stored(self, index: int, stored: StoredImage) -> None:
        """Record one stored image; a prompt is done once all its images are."""
        key = self.key_of[index]
        for other in self._same_object(index):
            if isinstance(self.outcomes.get(other), PromptFailure):
                continue
            paid = other == self.groups[key][0] and key not in self.cached_keys
            record = stored if paid else stored.model_copy(update={"cost_usd": 0.0})
            variants = self._variants.setdefault(other, {})
            variants[stored.variant] = record
            if len(variants) >= self._expected.get(other, 1):
                self.outcomes[other] = [variants[v] for v in sorted(variants)]

    def generation_failed(self, key: str, error: BaseException, charges: Charges) -> None:
        """Record a generation that failed, after `charges` for its broken answers."""
        if charges.usd:
            self.charged[key] = charges.usd
        if charges.possibly_usd:
            self.possibly_charged[key] = charges.possibly_usd
        if key in self.sources:
            self.source_done(key, error)
            return
        for index in self.groups[key]:
            self.outcomes[index] = self._failure(index, error, "generate")

    def wait(self, key: str, batch_id: str) -> None:
        """Record a group whose batch is still running: a later run collects it."""
        for index in self.groups[key]:
            self.waiting[index] = batch_id

    def stop(self, error: BaseException, not_attempted: list[str]) -> None:
        self.stopped_by = error
        for key in not_attempted:
            if key in self.sources:
                self.source_done(key, error)
                continue
            for index in self.groups[key]:
                self.outcomes[index] = self._failure(
                    index,
                    error,
                    "not attempted",
                    reason=f"Not attempted: the run stopped after {type(error).__name__}.",
                )

    def upload_failed(self, index: int, error: BaseException) -> None:
        for other in self._same_object(index):
            self.outcomes[other] = self._failure(other, error, "upload")

    def report(self) -> RunReport:
        images: list[StoredImage] = []
        failures: list[PromptFailure] = []
        for index in range(self.prompt_count):
            outcome = self.outcomes.get(index)
            if isinstance(outcome, PromptFailure):
                failures.append(outcome)
            elif outcome is not None:
                images += outcome
            for rendition in self._renditions_of(index):
                if isinstance(rendition, PromptFailure):
                    failures.append(rendition)
                else:
                    images.append(rendition)
        spent = self.spent_usd
        return RunReport(
            images=images,
            failures=failures,
            generated=len(self.paid_keys),
            from_cache=len(self.cached_keys),
            cost_usd=spent,
            possibly_charged_usd=round(sum(self.possibly_charged.values()), 6),
            waiting=[
                WaitingPrompt(
                    prompt=self.requests[index].prompt,
                    name=self.requests[index].name,
                    batch_id=batch_id,
                )
                for index, batch_id in sorted(self.waiting.items())
            ],
            synchronous_cost_usd=synchronous_cost(spent) if self.batch_api else None,
        )

    def rows(self) -> list[dict[str, Any]]:
        """One record per prompt, in the order given: for the manifest and the table."""
        rows: list[dict[str, Any]] = [
            {
                "index": index,
                "prompt": self.requests[index].prompt,
                "name": self.requests[index].name,
                "status": "waiting",
                "batch_id": batch_id,
            }
            for index, batch_id in self.waiting.items()
        ]
        for index, outcome in sorted(self.outcomes.items()):
            if index >= self.prompt_count:  # a source: its renditions are its prompt's
                continue
            key = self.key_of[index]
            rows += self._rendition_rows(index)
            if isinstance(outcome, PromptFailure):
                status = "not attempted" if outcome.stage == "not attempted" else "failed"
                first = self.groups[key][0] == index
                cost = self.charged.get(key, 0.0) if first else 0.0
                rows.append(
                    {"index": index, **outcome.model_dump(), "status": status, "cost_usd": cost}
                )
                continue
            cached = key in self.cached_keys
            for stored in outcome:
                rows.append(
                    {
                        "index": index,
                        **stored.model_dump(exclude={"more_images"}),
                        "status": "stored",
                        "cached": cached,
                    }
                )
        # Stable: each master's row first, then its renditions'.
        return sorted(rows, key=lambda row: (int(row["index"]), row.get("placement") is not None))

    def _rendition_rows(self, index: int) -> list[dict[str, Any]]:
        cached = self.key_of[index] in self.cached_keys
        rows: list[dict[str, Any]] = []
        for rendition in self._renditions_of(index):
            if isinstance(rendition, PromptFailure):
                rows.append(
                    {"index": index, **rendition.model_dump(), "status": "failed", "cost_usd": 0.0}
                )
            else:
                rows.append(
                    {
                        "index": index,
                        **rendition.model_dump(exclude={"more_images"}),
                        "status": "stored",
                        "cached": cached,
                    }
                )
        return rows

    def failure_message(self, report: RunReport, allow_failures: int) -> str:
        """Why the run fails, once everything good is stored: the stop, or the failures."""
        stored = f"{len(report.images)} images are stored and listed in {report.manifest_uri}."
        if self.stopped_by is not None:
            skipped = sum(f.stage == "not attempted" for f in report.failures)
            return (
                f"The run stopped: {self.stopped_by} {skipped} of {self.prompt_count} "
                f"prompts were not attempted. {stored}"
            )
        lines, more = failure_lines(report.failures)
        listed = [f"- {line}" for line in lines] + ([f"... and {more} more"] if more else [])
        renditions = sum(failure.placement is not None for failure in report.failures)
        prompts = len(report.failures) - renditions
        also = f" and {renditions} renditions" if renditions else ""
        return (
            f"{prompts} of {self.prompt_count} prompts{also} failed "
            f"(allow_failures={allow_failures}); {stored}\n" + "\n".join(listed)
        )

    def failed(self, report: RunReport, allow_failures: int) -> bool:
        """Whether the run should end Failed: it stopped early, or too many prompts failed."""
        return self.stopped_by is not None or len(report.failures) > allow_failures

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
