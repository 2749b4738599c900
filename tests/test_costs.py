"""What a run costs: priced before it starts, bounded by `max_cost_usd`, reported in full."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from prefect_aws import S3Bucket

from prefect_gpt_image import ImageRequest, OpenAICredentials, RapidAPICredentials, generate_images
from prefect_gpt_image._billing import call_cost
from prefect_gpt_image._responses import usage_of
from prefect_gpt_image.errors import BudgetExceededError, RunFailedError
from prefect_gpt_image.model_table import MODELS
from prefect_gpt_image.testing import Fault, GptImageEmulator


def test_a_run_over_budget_is_refused_before_any_paid_call(
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
    """Broken answers are charged and retried, so a run priced at its budget would run
    over it; no call is sent once its worst case would pass the budget."""
    prompts = [f"a thrifty thistle #{n}" for n in range(5)]
    for prompt in prompts[:2]:
        api.add_fault(Fault.malformed_body(), prompt_contains=prompt)

    with pytest.raises(RunFailedError) as raised:
        generate_images(
            prompts,
            bucket=bucket,
            credentials=credentials,
            limits={"max_concurrency": 1},
            max_cost_usd=0.15,
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

    with pytest.raises(RunFailedError) as raised:
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
    three in a row the route is not paid again, and the run stops with one message."""
    api.add_fault(Fault.expired_url(403), times=100)
    prompts = [f"an unlucky ibis #{n}" for n in range(5)]

    with pytest.raises(RunFailedError) as raised:
        generate_images(
            prompts, bucket=bucket, credentials=credentials, limits={"max_concurrency": 1}
        )

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


# -- the models after gpt-image-1.5 -------------------------------------------------------------


def test_gpt_image_2_bills_image_output_at_30_dollars_a_million_tokens(
    api: GptImageEmulator, model_route: Callable[..., OpenAICredentials], bucket: S3Bucket
) -> None:
    report = generate_images(
        ["a thirty-dollar tern"], bucket=bucket, credentials=model_route("gpt-image-2")
    )

    (call,) = api.calls
    assert call.usage is not None
    text, output = call.usage["input_tokens_details"]["text_tokens"], call.usage["output_tokens"]
    # OpenAI's pricing page: text in $5, image out $30 a million (gpt-image-1.5's was $32).
    assert report.cost_usd == pytest.approx((text * 5 + output * 30) / 1e6)


def test_gpt_image_2s_worst_case_is_its_published_price(
    api: GptImageEmulator, model_route: Callable[..., OpenAICredentials], bucket: S3Bucket
) -> None:
    """A high square is $0.211 on OpenAI's pricing page, and `auto` may be high: a budget
    under that is refused before any call (at gpt-image-1.5's tokens it looked like $0.13)."""
    route = model_route("gpt-image-2")
    for quality in ("high", None):
        with pytest.raises(BudgetExceededError, match=r"up to \$0\.21"):
            generate_images(
                ["a dear heron"],
                bucket=bucket,
                credentials=route,
                image={"quality": quality},
                max_cost_usd=0.2,
            )
    assert api.calls == []
    generate_images(["a dear heron"], bucket=bucket, credentials=route, max_cost_usd=0.22)
    assert api.billed == 1


def test_xhigh_and_max_are_priced_above_high_before_paying(
    api: GptImageEmulator, model_route: Callable[..., OpenAICredentials], bucket: S3Bucket
) -> None:
    """No figure is published for xhigh and max: the table's bounds price them above high,
    and `auto` on a model that has max is priced as max."""
    spec = MODELS["gpt-image-2.5-flare"]
    high, xhigh, top = (spec.price_per_image(q, 1024, 1024) or 0 for q in ("high", "xhigh", "max"))
    assert high < xhigh < top and spec.price_per_image("auto", 1024, 1024) == top

    flare = model_route("gpt-image-2.5-flare")
    with pytest.raises(BudgetExceededError):
        generate_images(
            ["an extra-fine egret"],
            bucket=bucket,
            credentials=flare,
            image={"quality": "xhigh"},
            max_cost_usd=round(high * 1.5, 2),
        )
    assert api.calls == []


def test_cached_input_tokens_are_billed_at_the_cached_prices() -> None:
    spec, request = MODELS["gpt-image-2"], ImageRequest(prompt="a cached curlew")
    details = {"text_tokens": 200, "image_tokens": 1000}
    cached = {"text_tokens": 100, "image_tokens": 600}
    split = {"cached_tokens": 700, "cached_tokens_details": cached}

    usage = usage_of({"usage": {**USAGE, "input_tokens_details": {**details, **split}}})
    # Text $5 (cached $1.25), image in $8 (cached $2), image out $30, per million.
    expected = (100 * 5 + 100 * 1.25 + 400 * 8 + 600 * 2 + 1000 * 30) / 1e6
    assert call_cost(spec, request, 1, usage) == pytest.approx(expected)

    # A count that does not say of which kind is taken off the text first: never billed low.
    unsplit = {**details, "cached_tokens": 300}
    usage = usage_of({"usage": {**USAGE, "input_tokens_details": unsplit}})
    expected = (200 * 1.25 + 900 * 8 + 100 * 2 + 1000 * 30) / 1e6
    assert call_cost(spec, request, 1, usage) == pytest.approx(expected)


USAGE = {"input_tokens": 1200, "output_tokens": 1000, "total_tokens": 2200}
