"""What a batch costs: priced before it starts, bounded by `max_cost_usd`, reported in full."""

from __future__ import annotations

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
    """Broken answers are charged and retried, so a batch priced at its budget runs over
    it; the flow stops submitting once the spend reaches the budget."""
    prompts = [f"a thrifty thistle #{n}" for n in range(5)]
    for prompt in prompts[:2]:
        api.add_fault(Fault.malformed_body(), prompt_contains=prompt)

    with pytest.raises(BatchFailedError) as raised:
        generate_images(
            prompts, bucket=bucket, credentials=credentials, max_concurrency=1, max_cost_usd=0.15
        )

    report = raised.value.report
    assert "max_cost_usd=$0.15" in str(raised.value)
    not_attempted = [f for f in report.failures if f.stage == "not attempted"]
    assert not_attempted and {f.error_type for f in not_attempted} == {"BudgetExceededError"}
    assert len(report.images) + len(not_attempted) == 5
    # Five images and two broken answers would have cost $0.21; it stopped short of that,
    # and the report counts every charged answer, broken ones included.
    assert api.billed < 7
    assert report.cost_usd == pytest.approx(api.billed * 0.03)
