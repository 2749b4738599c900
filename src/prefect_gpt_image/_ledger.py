"""The bookkeeping of one run: which prompts share a generation, what became of each, and
what it cost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prefect_gpt_image._billing import synchronous_cost, worst_case_over_routes
from prefect_gpt_image._caching import lookup_keys, request_cache_key
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
    from prefect_gpt_image.blocks._route import GptImageRoute

FAILURES_LISTED = 20
"""How many failures the flow's failure message, and the run's log, spell out."""


def failure_lines(failures: Sequence[PromptFailure]) -> tuple[list[str], int]:
    """The first `FAILURES_LISTED` failures, one line each (its prompt, its name, its
    error), and how many more there are: a run of thousands stays readable."""
    lines = []
    for failure in failures[:FAILURES_LISTED]:
        named = f" ({failure.name})" if failure.name and failure.name != failure.prompt else ""
        lines.append(f"{failure.prompt[:80]!r}{named}: {failure.error}")
    return lines, max(0, len(failures) - FAILURES_LISTED)


class RunLedger:
    """Identical requests (same cache key) share one generation; each distinct name among
    them gets its own object, and each image of an `n` above one too. Indexes are
    positions in the prompt set; keys are cache keys.
    """

    def __init__(
        self,
        requests: list[ImageRequest],
        routes: Sequence[GptImageRoute],
        refused: Mapping[int, BaseException] | None = None,
        *,
        batch_api: bool = False,
    ) -> None:
        """`refused`: requests that fail before anything is sent (an edit whose input is
        missing, say), by position; each is a group of its own, settled at once.
        `batch_api`: the requests go through OpenAI's Batch API, at its price."""
        refused = refused or {}
        self.requests = requests
        self.refused_count = len(refused)
        self.routes = routes
        self.key_of = [
            f"refused-{index}" if index in refused else request_cache_key(request, routes)
            for index, request in enumerate(requests)
        ]
        self.groups: dict[str, list[int]] = {}
        for index, key in enumerate(self.key_of):
            self.groups.setdefault(key, []).append(index)
        self.worst_case_usd = {
            key: 0.0
            if indexes[0] in refused
            else worst_case_over_routes(requests[indexes[0]], routes, batch=batch_api)
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
        for index, error in refused.items():
            self.outcomes[index] = self._failure(index, error, "check")

    @property
    def done(self) -> int:
        return len(self.outcomes)

    @property
    def finished(self) -> bool:
        """Whether every prompt has an outcome, or waits in a batch for a later run."""
        return self.done + len(self.waiting) == len(self.requests)

    @property
    def spent_usd(self) -> float:
        return round(sum(self.charged.values()), 6)

    def lookup_keys(self, key: str) -> list[str]:
        """Where a group's image may be cached: its key, or any of its routes' keys."""
        return lookup_keys(self.requests[self.groups[key][0]], self.routes)

    def settled(self, key: str) -> bool:
        """Whether every prompt of a group has an outcome (recorded from the cache, say)."""
        return all(index in self.outcomes for index in self.groups[key])

    def generated(self, key: str, image: GeneratedImage, *, cached: bool) -> None:
        if cached:
            self.cached_keys.add(key)
        else:
            self.paid_keys.add(key)
            self.charged[key] = image.cost_usd
            self.possibly_charged[key] = image.possibly_charged_usd
        for index in self.groups[key]:
            self._expected[index] = image.image_count

    def uploads(self, key: str) -> list[int]:
        """The prompts of a group that need an object each: one per distinct name."""
        by_name: dict[str | None, int] = {}
        for index in self.groups[key]:
            by_name.setdefault(self.requests[index].name, index)
        return list(by_name.values())

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
        for index in self.groups[key]:
            self.outcomes[index] = self._failure(index, error, "generate")

    def wait(self, key: str, batch_id: str) -> None:
        """Record a group whose batch is still running: a later run collects it."""
        for index in self.groups[key]:
            self.waiting[index] = batch_id

    def stop(self, error: BaseException, not_attempted: list[str]) -> None:
        self.stopped_by = error
        for key in not_attempted:
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
        ordered = [self.outcomes[i] for i in range(len(self.requests)) if i in self.outcomes]
        spent = self.spent_usd
        return RunReport(
            images=[image for o in ordered if isinstance(o, list) for image in o],
            failures=[o for o in ordered if isinstance(o, PromptFailure)],
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
            key = self.key_of[index]
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
        return sorted(rows, key=lambda row: int(row["index"]))

    def failure_message(self, report: RunReport, allow_failures: int) -> str:
        """Why the run fails, once everything good is stored: the stop, or the failures."""
        stored = f"{len(report.images)} images are stored and listed in {report.manifest_uri}."
        if self.stopped_by is not None:
            skipped = sum(f.stage == "not attempted" for f in report.failures)
            return (
                f"The run stopped: {self.stopped_by} {skipped} of {len(self.requests)} "
                f"prompts were not attempted. {stored}"
            )
        lines, more = failure_lines(report.failures)
        listed = [f"- {line}" for line in lines] + ([f"... and {more} more"] if more else [])
        return (
            f"{len(report.failures)} of {len(self.requests)} prompts failed "
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
