"""The Batch API (`batch=BatchOptions()`): reading what OpenAI's batches answer, when the
answers are not clean.

Against the emulator's Batch API, with images stored in a real S3 server. What a user
relies on: a line that cannot be read fails its own prompt and no other, and the next run
sends only that prompt; a prompt the API refused is not paid for again on every scheduled
run; a line no request of the batch asked for changes nothing; and a failure says "not
charged" where, and only where, that is true.
"""

from __future__ import annotations

import uuid

import pytest
from batch_runs import objects, run
from prefect_aws import S3Bucket

from prefect_gpt_image import OpenAICredentials
from prefect_gpt_image.errors import RunFailedError
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server


def prompts(count: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"a paper lantern number {i} over a river, {tag}" for i in range(count)]


def sent(api: GptImageEmulator, prompt: str) -> int:
    """How many times `prompt` was sent in a batch."""
    return sum(call.prompt == prompt for call in api.batch_calls)


@pytest.mark.parametrize("kind", ["not_json", "truncated", "no_custom_id"])
def test_an_unreadable_line_fails_its_prompt_alone_and_the_next_run_sends_only_that_one(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    kind: str,
) -> None:
    texts = prompts(6)
    batch_api.add_batch_output_fault(kind, prompt_contains=texts[2])

    first = run(openai_credentials, bucket, texts, allow_failures=1)

    assert len(first.images) == 5 and not first.waiting
    (failure,) = first.failures
    assert failure.prompt == texts[2] and failure.error_type == "InvalidResponseError"
    assert "could not be read" in failure.error and "may have been charged" in failure.error
    assert {"not_json": "not JSON", "truncated": "cut short"}.get(kind, "no custom_id") in (
        failure.error
    )
    assert "next run sends it again" in failure.error
    assert len(objects(s3_server, bucket)) == 5

    second = run(openai_credentials, bucket, texts)

    assert len(second.images) == 6 and second.generated == 1 and second.from_cache == 5
    assert batch_api.stats["batches_created"] == 2
    assert len(batch_api.batch_calls) == 7 and sent(batch_api, texts[2]) == 2
    assert len(objects(s3_server, bucket)) == 6


def test_a_refused_prompt_is_not_sent_again_until_it_changes_or_refresh_cache_asks(
    batch_api: GptImageEmulator, openai_credentials: OpenAICredentials, bucket: S3Bucket
) -> None:
    refused = f"[reject] a prompt the model refuses, {uuid.uuid4().hex[:6]}"
    texts = [*prompts(2), refused]

    # The shipped schedule runs the same prompts again every 15 minutes.
    reports = [run(openai_credentials, bucket, texts, allow_failures=1) for _ in range(3)]

    assert batch_api.stats["batches_created"] == 1 and sent(batch_api, refused) == 1
    for report in reports:
        assert len(report.images) == 2
        (failure,) = report.failures
        assert failure.prompt == refused and failure.error_type == "PromptRejectedError"
        assert "moderation_blocked" in failure.error
    assert "not sent again" in reports[1].failures[0].error
    assert reports[1].cost_usd == 0 and reports[2].cost_usd == 0

    reworded = refused + ", reworded"
    changed = run(openai_credentials, bucket, [*texts[:2], reworded], allow_failures=1)

    assert changed.failures[0].prompt == reworded
    assert batch_api.stats["batches_created"] == 2 and sent(batch_api, reworded) == 1

    refreshed = run(
        openai_credentials, bucket, [refused], cache={"refresh": True}, allow_failures=1
    )

    assert refreshed.failures[0].error_type == "PromptRejectedError"
    assert batch_api.stats["batches_created"] == 3 and sent(batch_api, refused) == 2


def test_a_stray_line_with_a_cached_requests_id_is_ignored_and_its_image_still_served(
    batch_api: GptImageEmulator, openai_credentials: OpenAICredentials, bucket: S3Bucket
) -> None:
    first, second = prompts(2)
    one = run(openai_credentials, bucket, [first])
    (call,) = batch_api.batch_calls
    # The next batch's output also carries `first`'s custom_id, with `second`'s image.
    batch_api.add_batch_output_fault("stray", prompt_contains=second, custom_id=call.custom_id)

    two = run(openai_credentials, bucket, [second])

    assert len(two.images) == 1 and not two.failures and two.images[0].prompt == second
    again = run(openai_credentials, bucket, [first], batch={"enabled": False}, prefix="again")
    assert batch_api.calls == [] and again.from_cache == 1
    assert again.images[0].sha256 == one.images[0].sha256


def test_a_batch_answer_never_replaces_a_different_image_already_cached(
    batch_api: GptImageEmulator, openai_credentials: OpenAICredentials, bucket: S3Bucket
) -> None:
    batch_api.batch_processing_seconds = 3
    first, second = prompts(2)
    waiting = run(openai_credentials, bucket, [first, second], batch={"wait_minutes": 0})
    assert len(waiting.waiting) == 2
    # Meanwhile a synchronous run pays for `first` anew (a batch holds it, so only
    # refresh_cache pays) and stores what it was served.
    synchronous = run(
        openai_credentials,
        bucket,
        [first],
        batch={"enabled": False},
        prefix="p",
        cache={"refresh": True},
    )
    assert len(batch_api.calls) == 1

    later = run(openai_credentials, bucket, [first, second], prefix="p")

    assert len(later.images) == 2 and later.from_cache == 1
    again = run(openai_credentials, bucket, [first], batch={"enabled": False}, prefix="again")
    assert len(batch_api.calls) == 1 and again.from_cache == 1
    assert again.images[0].sha256 == synchronous.images[0].sha256


def test_requests_an_expired_batch_never_ran_are_said_not_charged_once(
    batch_api: GptImageEmulator, openai_credentials: OpenAICredentials, bucket: S3Bucket
) -> None:
    batch_api.batch_expire_after = 1

    with pytest.raises(RunFailedError) as failed:
        run(openai_credentials, bucket, prompts(3))

    failures = failed.value.report.failures
    assert len(failures) == 2
    for failure in failures:
        assert failure.error_type == "BatchNotDoneError"
        assert "completion window expired" in failure.error
        assert failure.error.count("not charged") == 1 and ".." not in failure.error
        assert failure.error.endswith("the next run sends it again.")
