"""What a batch costs: priced before it starts, bounded by `max_cost_usd`, reported in full."""

from __future__ import annotations

import time

import pytest
from prefect_aws import S3Bucket

from prefect_gpt_image import RapidAPICredentials, generate_images
from prefect_gpt_image.errors import BatchFailedError, BudgetExceededError
from prefect_gpt_image.testing import Fault, GptImageEmulator


def test_a_batch_over_budget_is_refused_before_any_paid_call(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    prompts = [f"a budgeted bellflower #{n}" for n in range(5)]
    generate_images(prompts[:2], bucket=bucket, credentials=credentials)
    assert api.billed == 2

    # Three images are not cached yet: $0.09, over the budget.
    with pytest.raises(
        BudgetExceededError, match=r"needs 3 new generations, up to \$0\.09"
    ) as refused:
        generate_images(prompts, bucket=bucket, credentials=credentials, max_cost_usd=0.08)
    assert "Nothing was generated" in str(refused.value)
    assert api.billed == 2

    report = generate_images(prompts, bucket=bucket, credentials=credentials, max_cost_usd=0.09)
    assert (report.generated, report.from_cache) == (3, 2)
    assert report.cost_usd == pytest.approx(0.09)
    assert api.billed == 5


def test_the_spend_stops_submissions_at_the_budget(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    """Broken answers are charged and retried, so a batch priced at its budget would run
    over it; no call is sent once its worst case would pass the budget."""
    prompts = [f"a thrifty thistle #{n}" for n in range(5)]
    for prompt in prompts[:2]:
        api.add_fault(Fault.malformed_body(), prompt_contains=prompt)

    with pytest.raises(BatchFailedError) as raised:
        generate_images(
            prompts, bucket=bucket, credentials=credentials, max_concurrency=1, max_cost_usd=0.15
        )

    report = raised.value.report
    assert "max_cost_usd=$0.15" in str(raised.value)
    assert report.failures and {f.error_type for f in report.failures} == {"BudgetExceededError"}
    assert len(report.images) + len(report.failures) == 5
    # Five images and two broken answers would have cost $0.21; the cap held at $0.15, and
    # the report counts every charged answer, broken ones included.
    assert api.billed * 0.03 <= 0.15 + 1e-9
    assert report.cost_usd == pytest.approx(api.billed * 0.03)


def test_retries_of_charged_answers_never_pass_the_cap(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    """Every paid attempt, first or retry, holds its price before it is sent: two prompts
    whose answers keep breaking spend $0.06 under a $0.06 cap, not $0.18."""
    for prompt in ("a capped cormorant", "a capped curlew"):
        api.add_fault(Fault.malformed_body(), prompt_contains=prompt, times=2)

    with pytest.raises(BatchFailedError) as raised:
        generate_images(
            ["a capped cormorant", "a capped curlew"],
            bucket=bucket,
            credentials=credentials,
            max_cost_usd=0.06,
        )

    assert api.billed == 2
    report = raised.value.report
    assert report.cost_usd == pytest.approx(0.06)
    assert {f.error_type for f in report.failures} == {"BudgetExceededError"}
    assert "was not sent" in report.failures[0].error


# The retries' waits keep here what "in a row" counts: without them, the next request goes
# out while the last answer's image is still being fetched, and a fourth answer is paid for.
@pytest.mark.production_retry_delays
def test_systematic_paid_failures_stop_paying_the_route(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    """When every image URL answers 403, each answer is charged and none is usable: after
    three in a row the route is not paid again, and the batch stops with one message."""
    api.add_fault(Fault.expired_url(403), times=100)
    prompts = [f"an unlucky ibis #{n}" for n in range(5)]

    with pytest.raises(BatchFailedError) as raised:
        generate_images(prompts, bucket=bucket, credentials=credentials, max_concurrency=1)

    assert api.billed == 3
    assert "answers in a row" in str(raised.value) and "stops paying" in str(raised.value)
    assert raised.value.report.cost_usd == pytest.approx(0.09)


def test_a_call_that_timed_out_after_it_was_sent_counts_as_possibly_charged(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    api.add_fault(Fault.stall(2.5))
    impatient = credentials.model_copy(update={"timeout_seconds": 1.0})

    report = generate_images(["a stalled stork"], bucket=bucket, credentials=impatient)

    assert len(report.images) == 1
    # The stalled call finishes at the provider, and is billed, maybe after the run ends:
    # the report says it may be.
    deadline = time.monotonic() + 10
    while api.billed < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.billed == 2
    assert (report.cost_usd, report.possibly_charged_usd) == (pytest.approx(0.03),) * 2
    assert "up to $0.03 for calls that timed out" in report.summary()
