"""Review before publishing: the names a reviewer decides on, a decision checked against
them, the wait for it, and the copy of what was approved to the publish folder.

A run started from a deployment is suspended while it waits (no worker is held; on resume
it runs again from the top, and what it paid for comes from the cache); a run started as a
script is paused (its process waits, as there is nothing that could start it again).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import pydantic
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input.actions import read_flow_run_input
from prefect.logging import get_run_logger
from prefect.runtime import deployment, flow_run
from pydantic import BaseModel, Field

from prefect_gpt_image._artifacts import Link, publish_published, publish_results
from prefect_gpt_image._events import IMAGES_PUBLISHED, REVIEW_REQUESTED, emit
from prefect_gpt_image._ledger import RunLedger
from prefect_gpt_image._manifest import put_manifest, read_manifest, write_manifest
from prefect_gpt_image._object_keys import join_key, s3_uri
from prefect_gpt_image._retry_policy import call_with_retries
from prefect_gpt_image._storage import copy_object
from prefect_gpt_image.errors import ConfigurationError, InvalidRequestError, ReviewTimeoutError
from prefect_gpt_image.models import ImageRequest, RunReport, StoredImage
from prefect_gpt_image.options import ReviewDecision, ReviewOptions

if TYPE_CHECKING:
    from prefect_aws import S3Bucket

    from prefect_gpt_image._routes import Route


POLL_SECONDS = 5
"""How often a paused run asks Prefect whether it was resumed."""

Verdict = Literal["approved", "rejected", "dropped"]


class Decided(BaseModel):
    """One image's decision, as the manifest records it."""

    decision: Verdict
    note: str = Field(default="", description="The reviewer's note, for a rejection.")
    round: int = Field(description="The round of review it was decided in, from 1.")
    decided_at: datetime


def masters(images: Sequence[StoredImage]) -> list[StoredImage]:
    """The images a reviewer decides on: a campaign's renditions follow their master."""
    return [image for image in images if not image.is_rendition]


def review_form(names: Sequence[str], description: str) -> type[ReviewDecision]:
    """The decision's form, opening with every image approved: approving most and
    rejecting a few takes a few clicks."""
    approved = ReviewDecision.model_fields["approved"]
    form = pydantic.create_model(
        "ReviewDecision",
        __base__=ReviewDecision,
        approved=(list[str], Field(default=list(names), description=approved.description)),
    )
    form._description = description
    return form


def check_decision(decision: ReviewDecision, names: Sequence[str]) -> None:
    """Refuse a decision that names an image the round does not have: it is never guessed."""
    unknown = sorted((set(decision.approved) | decision.rejected.keys()) - set(names))
    if unknown:
        raise InvalidRequestError(
            f"The decision names {len(unknown)} image(s) this round does not have: "
            f"{', '.join(unknown)}. Its images: {', '.join(names)}."
        )


def verdicts(
    decision: ReviewDecision, names: Sequence[str], *, round: int, last_round: bool
) -> dict[str, Decided]:
    """Each name's verdict. A rejection with a note asks for a new version, except in the
    last round, where there is none to come: the image is dropped, its note kept."""
    now = datetime.now(timezone.utc)
    decided = partial(Decided, round=round, decided_at=now)
    out: dict[str, Decided] = {}
    for name in names:
        if name in decision.rejected:
            note = decision.rejected[name].strip()
            verdict: Verdict = "rejected" if note and not last_round else "dropped"
            out[name] = decided(decision=verdict, note=note)
        elif decision.approve_all or name in decision.approved:
            out[name] = decided(decision="approved")
        else:
            out[name] = decided(decision="dropped")
    return out


def wait_for_decision(
    names: Sequence[str], description: str, *, key: str, timeout_hours: float, suspend: bool
) -> ReviewDecision:
    """The reviewer's decision, waited for under `key`: suspended (the process ends and the
    run starts again on resume), or paused (the process waits). `FlowPauseTimeout` when no
    decision comes in time, from a paused run."""
    form = review_form(names, description)
    timeout = round(timeout_hours * 3600)
    if suspend:
        decision = suspend_flow_run(wait_for_input=form, timeout=timeout, key=key)
    else:
        decision = pause_flow_run(
            wait_for_input=form, timeout=timeout, key=key, poll_interval=POLL_SECONDS
        )
    return ReviewDecision.model_validate(decision.model_dump())


def answered(key: str, *, suspend: bool) -> bool:
    """Whether the wait under `key` was answered already: a suspended run that starts again
    finds its decision without waiting, and asks for it only once."""
    base = f"{'suspended' if suspend else 'paused'}-{key}"
    return read_flow_run_input(key=f"{base}-response") is not None


def is_deployed() -> bool:
    """Whether this run comes from a deployment, which a worker can start again."""
    return deployment.get_id() is not None


def publish(
    bucket: S3Bucket, images: Sequence[StoredImage], folder_key: str, publish_prefix: str
) -> list[StoredImage]:
    """Copy `images` to the publish folder under `folder_key` (the run's folder, within the
    bucket), server-side, under their file names: the records of the copies."""
    published: list[StoredImage] = []
    for image in images:
        key = join_key(folder_key, publish_prefix, image.file_name)
        call_with_retries(partial(copy_object, bucket, image.key, key))
        uri = s3_uri(bucket.bucket_name, key)
        published.append(image.model_copy(update={"key": key, "uri": uri}))
    return published


def publish_from_manifest(
    bucket: S3Bucket, manifest_key: str, approved: Sequence[str] | None, publish_prefix: str
) -> list[StoredImage]:
    """Publish, without a flow run, the images of a run's manifest that are `approved` by
    name (None: every one), with their renditions, by the rules of a review; record the
    decisions in the manifest. A name the manifest does not hold is refused, with the list."""
    rows = read_manifest(bucket, manifest_key)
    images = [StoredImage.model_validate(row) for row in rows if row.get("status") == "stored"]
    names = [image.file_name for image in masters(images)]
    decision = ReviewDecision(approve_all=approved is None, approved=list(approved or []))
    check_decision(decision, names)
    decided = {
        name: verdict
        for name, verdict in verdicts(decision, names, round=1, last_round=True).items()
        if verdict.decision == "approved"  # the others are left for a later decision
    }
    folder_key = manifest_key.rpartition("/")[0]
    published = publish(bucket, approved_images(images, decided), folder_key, publish_prefix)
    lines = recorded(rows, images, decided, published)
    put_manifest(bucket, manifest_key, lines)
    return published


def revision(image: StoredImage, note: str) -> ImageRequest:
    """The request for a rejected image's new version: an edit of it, with its prompt and
    the reviewer's note."""
    return ImageRequest(
        prompt=f"{image.prompt}\n\nChange requested in review: {note}",
        name=image.name,
        images=(image.uri,),
        width=image.width,
        height=image.height,
    )


def check_review(options: ReviewOptions, routes: Sequence[Route]) -> None:
    """Refuse, before anything is paid, a review whose rejections could not be edited."""
    if options.max_rounds > 1 and not any(route.can_edit for route in routes):
        raise ConfigurationError(
            f"review.max_rounds={options.max_rounds} edits each image rejected with a note, "
            "and no route of this run edits images: add an OpenAI-protocol route whose model "
            "edits, or set review.max_rounds=1 (a rejection then drops the image)."
        )


Revise = Callable[[list[ImageRequest]], RunLedger]
"""Makes and stores a round's revisions: the run's own settings, routes and budget."""


class Review:
    """A run's rounds of review, then the publishing of what was approved.

    Each round waits for one decision on the round's new images (a campaign's renditions
    follow their master's); a rejection with a note is edited with it, and the new version
    is reviewed in the next round, up to `max_rounds`.
    """

    def __init__(
        self,
        options: ReviewOptions,
        bucket: S3Bucket,
        folder: str,
        link: Link,
        safe_zones: Mapping[str, str] | None,
        revise: Revise,
    ) -> None:
        self.options, self.bucket, self.folder = options, bucket, folder
        self.link, self.safe_zones, self.revise = link, safe_zones, revise
        self.suspend = is_deployed()
        self.logger = get_run_logger()

    def run(self, report: RunReport, rows: list[dict[str, Any]]) -> RunReport:
        """Review `report`'s images, publish the approved ones, and record every decision in
        the manifest: the report of every round."""
        decided: dict[str, Decided] = {}
        pending = masters(report.images)
        for round_ in range(1, self.options.max_rounds + 1):
            if not pending:
                break
            names = [image.file_name for image in pending]
            decision = self._decision(names, round_, report)
            last = round_ == self.options.max_rounds
            verdict = verdicts(decision, names, round=round_, last_round=last)
            decided.update(verdict)
            notes = [(i, verdict[i.file_name].note) for i in pending]
            rejected = [
                (i, note) for i, note in notes if verdict[i.file_name].decision == "rejected"
            ]
            if not rejected:
                break
            ledger = self.revise([revision(image, note) for image, note in rejected])
            new, new_rows = ledger.report(), ledger.rows()
            rows = [*rows, *({**row, "round": round_ + 1} for row in new_rows)]
            report = merged(report, new)
            write_manifest(self.bucket, self.folder, report, rows, key=report.manifest_key)
            publish_results(rows, report, self.link, self.safe_zones, review=True)
            pending = masters(new.images)
        approved = approved_images(report.images, decided)
        folder_key = join_key(self.bucket.bucket_folder, self.folder)
        published = publish(self.bucket, approved, folder_key, self.options.publish_prefix)
        rows = recorded(rows, report.images, decided, published)
        write_manifest(self.bucket, self.folder, report, rows, key=report.manifest_key)
        publish_published(published, self.link)
        approved_count = sum(d.decision == "approved" for d in decided.values())
        emit(
            IMAGES_PUBLISHED,
            {
                "published": len(published),
                "approved": approved_count,
                "dropped": sum(d.decision == "dropped" for d in decided.values()),
                "folder": s3_uri(
                    self.bucket.bucket_name,
                    join_key(self.bucket.bucket_folder, self.folder, self.options.publish_prefix),
                ),
                "manifest": report.manifest_uri,
            },
        )
        self.logger.info(
            "Published %d object(s) of %d approved image(s) to %s",
            len(published),
            approved_count,
            self.options.publish_prefix,
        )
        return report

    def _decision(self, names: list[str], round_: int, report: RunReport) -> ReviewDecision:
        """The round's decision, once it names only the round's images: a decision naming
        another is refused with the list of names, and the run waits again."""
        attempt = 0
        while True:
            key = f"review-{round_}-{attempt}"
            if not (self.suspend and answered(key, suspend=True)):
                self._request(names, round_, report)
            try:
                decision = wait_for_decision(
                    names,
                    self._description(names, round_),
                    key=key,
                    timeout_hours=self.options.timeout_hours,
                    suspend=self.suspend,
                )
            except FlowPauseTimeout:
                raise ReviewTimeoutError(
                    f"No review decision came within {self.options.timeout_hours:g} hours; "
                    "nothing was published and every image is kept. Publish later with: "
                    f"{publish_command(report)}"
                ) from None
            try:
                check_decision(decision, names)
            except InvalidRequestError as exc:
                self.logger.warning("%s The run waits for another decision.", exc)
                attempt += 1
                continue
            return decision

    def _request(self, names: list[str], round_: int, report: RunReport) -> None:
        renditions = sum(image.is_rendition for image in report.images)
        emit(
            REVIEW_REQUESTED,
            {
                "round": round_,
                "max_rounds": self.options.max_rounds,
                "images": len(names),
                "renditions": renditions,
                "names": names,
                "gallery": artifacts_url(),
                "manifest": report.manifest_uri,
                "timeout_hours": self.options.timeout_hours,
            },
        )
        how = "suspended: no worker is held" if self.suspend else "paused"
        self.logger.info(
            "Waiting up to %g hours for a review of %d image(s), round %d of %d (%s). "
            "Decide with Resume on the run's page in Prefect; the gallery is in its "
            "artifacts. Without a decision in time, nothing is published; publish later with: "
            "%s",
            self.options.timeout_hours,
            len(names),
            round_,
            self.options.max_rounds,
            how,
            publish_command(report),
        )

    def _description(self, names: list[str], round_: int) -> str:
        listed = "\n".join(f"- `{name}`" for name in names)
        return (
            f"### Review, round {round_} of {self.options.max_rounds}: {len(names)} image(s)\n\n"
            f"Look at them in the [gallery]({artifacts_url()}). Every image is approved below: "
            "take out of **approved** what should not be published, or move it to "
            "**rejected** with a note asking for a change (an empty note drops it).\n\n"
            f"{listed}"
        )


def publish_command(report: RunReport) -> str:
    """The command that publishes the run's images later, from its manifest."""
    return f"prefect-gpt-image publish {report.manifest_uri} --approve NAME ... (or --approve-all)"


def merged(first: RunReport, then: RunReport) -> RunReport:
    """The report of two rounds of one run."""
    return first.model_copy(
        update={
            "images": [*first.images, *then.images],
            "failures": [*first.failures, *then.failures],
            "generated": first.generated + then.generated,
            "from_cache": first.from_cache + then.from_cache,
            "cost_usd": round(first.cost_usd + then.cost_usd, 6),
            "possibly_charged_usd": round(
                first.possibly_charged_usd + then.possibly_charged_usd, 6
            ),
        }
    )


def approved_images(
    images: Sequence[StoredImage], decided: Mapping[str, Decided]
) -> list[StoredImage]:
    """The approved images, each with its renditions."""
    approved = {
        image.sha256
        for image in masters(images)
        if (d := decided.get(image.file_name)) is not None and d.decision == "approved"
    }
    return [image for image in images if _master_sha256(image) in approved]


def recorded(
    rows: Sequence[dict[str, Any]],
    images: Sequence[StoredImage],
    decided: Mapping[str, Decided],
    published: Sequence[StoredImage],
) -> list[dict[str, Any]]:
    """The manifest's lines with each image's decision (a rendition's is its master's), and
    where it was published."""
    names = {image.sha256: image.file_name for image in masters(images)}
    published_at = {image.file_name: image.uri for image in published}
    by_key = {image.key: image for image in images}
    out: list[dict[str, Any]] = []
    for row in rows:
        image = by_key.get(row.get("key", ""))
        name = names.get(_master_sha256(image)) if image is not None else None
        decision = decided.get(name or "")
        if image is None or decision is None:
            out.append(row)
            continue
        out.append(
            {
                **row,
                **decision.model_dump(mode="json"),
                "reviewed_as": name,
                "published_uri": published_at.get(image.file_name),
            }
        )
    return out


def _master_sha256(image: StoredImage) -> str:
    return image.source_sha256 if image.is_rendition and image.source_sha256 else image.sha256


def artifacts_url() -> str:
    """The run's artifacts in Prefect's UI, where the gallery is."""
    url = flow_run.get_flow_run_ui_url()
    return f"{url}?tab=Artifacts" if url else ""
