"""The run's ledger on its own, without a flow, a client or a bucket: which prompts share a
generation, what became of each, what it cost, and what the run says when it fails."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import pytest

from prefect_gpt_image import ImageRequest, RapidAPICredentials
from prefect_gpt_image._charges import Charges
from prefect_gpt_image._ledger import FAILURES_LISTED, RunLedger
from prefect_gpt_image.errors import (
    AuthenticationError,
    InvalidRequestError,
    PromptRejectedError,
    StorageError,
)
from prefect_gpt_image.models import GeneratedImage, ImageFile, StoredImage

ROUTE = RapidAPICredentials(api_key="key", base_url="http://127.0.0.1:9")
PRICE = ROUTE.price_per_image_usd


def request(prompt: str, name: str | None = None, n: int = 1) -> ImageRequest:
    return ImageRequest(prompt=prompt, name=name, n=n)


def generated(of: ImageRequest, cost: float = PRICE, images: int = 1) -> GeneratedImage:
    data = f"png of {of.prompt}".encode()
    more = [
        ImageFile(
            data=data + bytes([n]),
            media_type="image/png",
            sha256=hashlib.sha256(data + bytes([n])).hexdigest(),
            width=1024,
            height=1024,
        )
        for n in range(1, images)
    ]
    return GeneratedImage(
        data=data,
        media_type="image/png",
        sha256=hashlib.sha256(data).hexdigest(),
        width=1024,
        height=1024,
        request=of,
        model="gpt-image-1.5",
        generated_at=datetime.now(timezone.utc),
        cost_usd=cost,
        more_images=more,
    )


def stored(image: GeneratedImage, key: str) -> StoredImage:
    return StoredImage.of(image, "bucket", key)


def test_identical_requests_share_one_generation_and_each_name_gets_its_object() -> None:
    requests = [
        request("a mug"),
        request("a mug"),
        request("a mug", name="hero"),
        request("a vase"),
    ]
    ledger = RunLedger(requests, [ROUTE])

    assert len(ledger.groups) == 2  # one generation for the mug, one for the vase
    mug = ledger.key_of[0]
    assert ledger.uploads(mug) == [0, 2]  # the unnamed mug once, the "hero" mug once
    assert ledger.worst_case_usd[mug] == PRICE

    image = generated(requests[0])
    ledger.generated(mug, image, cached=False)
    ledger.stored(0, stored(image, "a-mug.png"))
    ledger.stored(2, stored(image, "hero.png"))
    assert not ledger.finished and ledger.done == 3

    vase = ledger.key_of[3]
    ledger.generated(vase, generated(requests[3]), cached=False)
    ledger.stored(3, stored(generated(requests[3]), "a-vase.png"))
    report = ledger.report()

    assert ledger.finished
    assert [image.key for image in report.images] == [
        "a-mug.png",
        "a-mug.png",
        "hero.png",
        "a-vase.png",
    ]
    # The mug was paid once: its first prompt carries the cost, the others none.
    assert [image.cost_usd for image in report.images] == [PRICE, 0.0, 0.0, PRICE]
    assert (report.generated, report.from_cache, report.cost_usd) == (2, 0, 2 * PRICE)


def test_a_prompt_is_done_once_every_image_of_its_call_is_stored() -> None:
    three = request("three mugs", n=3)
    ledger = RunLedger([three], [ROUTE])
    key = ledger.key_of[0]
    image = generated(three, cost=3 * PRICE, images=3)
    ledger.generated(key, image, cached=False)

    for variant in image.variants()[:2]:
        ledger.stored(0, stored(variant, f"mug-{variant.variant}.png"))
    assert ledger.done == 0
    ledger.stored(0, stored(image.variants()[2], "mug-2.png"))

    assert ledger.done == 1
    assert [image.key for image in ledger.report().images] == [
        "mug-0.png",
        "mug-1.png",
        "mug-2.png",
    ]


def test_what_the_cache_served_costs_nothing() -> None:
    mug = request("a mug")
    ledger = RunLedger([mug], [ROUTE])
    image = generated(mug)
    ledger.generated(ledger.key_of[0], image, cached=True)
    ledger.stored(0, stored(image, "a-mug.png"))

    report = ledger.report()
    assert (report.generated, report.from_cache, report.cost_usd) == (0, 1, 0.0)
    assert report.images[0].cost_usd == 0.0
    assert ledger.rows()[0]["cached"] is True


def test_a_failed_generation_fails_its_prompts_and_keeps_what_was_charged() -> None:
    requests = [request("[reject] a rejected raven"), request("[reject] a rejected raven")]
    ledger = RunLedger(requests, [ROUTE])
    charged = Charges(calls=2, usd=2 * PRICE, possibly_usd=PRICE)
    ledger.generation_failed(ledger.key_of[0], PromptRejectedError("refused"), charged)

    report = ledger.report()
    assert [failure.stage for failure in report.failures] == ["generate", "generate"]
    assert (report.cost_usd, report.possibly_charged_usd) == (2 * PRICE, PRICE)
    # The table charges the group's first prompt only.
    assert [row["cost_usd"] for row in ledger.rows()] == [2 * PRICE, 0.0]
    assert ledger.failed(report, allow_failures=1)
    assert not ledger.failed(report, allow_failures=2)


def test_a_refused_request_is_settled_before_anything_is_sent() -> None:
    requests = [request("a mug"), request("an edit of a missing photo")]
    missing = InvalidRequestError("photo.png: no such file")
    ledger = RunLedger(requests, [ROUTE], refused={1: missing})

    assert ledger.refused_count == 1
    assert ledger.settled(ledger.key_of[1]) and not ledger.settled(ledger.key_of[0])
    assert ledger.worst_case_usd[ledger.key_of[1]] == 0.0  # never sent, never paid
    (failure,) = ledger.report().failures
    assert (failure.stage, failure.error) == ("check", "photo.png: no such file")


def test_an_upload_that_failed_fails_the_prompts_of_that_object_only() -> None:
    requests = [request("a mug"), request("a mug"), request("a mug", name="hero")]
    ledger = RunLedger(requests, [ROUTE])
    image = generated(requests[0])
    ledger.generated(ledger.key_of[0], image, cached=False)
    ledger.upload_failed(0, StorageError("S3 refused the write", retryable=False))
    ledger.stored(2, stored(image, "hero.png"))

    report = ledger.report()
    assert [failure.stage for failure in report.failures] == ["upload", "upload"]
    assert [image.key for image in report.images] == ["hero.png"]


def test_a_stopped_run_reports_the_rest_as_not_attempted_and_says_why() -> None:
    requests = [request("a mug"), request("a vase"), request("a lamp")]
    ledger = RunLedger(requests, [ROUTE])
    rejected = AuthenticationError("rejected the API key", status_code=401)
    ledger.generation_failed(ledger.key_of[0], rejected, Charges())
    ledger.stop(rejected, not_attempted=[ledger.key_of[1], ledger.key_of[2]])

    report = ledger.report()
    assert [failure.stage for failure in report.failures] == [
        "generate",
        "not attempted",
        "not attempted",
    ]
    assert ledger.failed(report, allow_failures=10)  # a stop fails the run, whatever it allows
    message = ledger.failure_message(report, allow_failures=10)
    assert message.startswith("The run stopped: rejected the API key 2 of 3 prompts were not")


def test_a_prompt_waiting_in_a_batch_is_neither_done_nor_lost() -> None:
    requests = [request("a mug"), request("a vase")]
    ledger = RunLedger(requests, [ROUTE], batch_api=True)
    assert ledger.worst_case_usd[ledger.key_of[0]] == pytest.approx(PRICE / 2)

    ledger.wait(ledger.key_of[0], "batch_123")
    image = generated(requests[1], cost=PRICE / 2)
    ledger.generated(ledger.key_of[1], image, cached=False)
    ledger.stored(1, stored(image, "a-vase.png"))

    report = ledger.report()
    assert ledger.finished
    assert [(w.prompt, w.batch_id) for w in report.waiting] == [("a mug", "batch_123")]
    assert report.synchronous_cost_usd == pytest.approx(PRICE)  # what it costs without batches
    assert [row["status"] for row in ledger.rows()] == ["waiting", "stored"]


def test_the_failure_message_lists_the_first_failures_and_counts_the_rest() -> None:
    requests = [request(f"a failed ferret #{n}") for n in range(FAILURES_LISTED + 3)]
    ledger = RunLedger(requests, [ROUTE])
    for key in ledger.groups:
        ledger.generation_failed(key, PromptRejectedError("refused"), Charges())

    report = ledger.report()
    message = ledger.failure_message(report, allow_failures=0)
    assert message.startswith(f"{FAILURES_LISTED + 3} of {FAILURES_LISTED + 3} prompts failed")
    assert message.count(": refused") == FAILURES_LISTED
    assert message.endswith("... and 3 more")
