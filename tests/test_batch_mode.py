"""`batch=BatchOptions()`: the flow through OpenAI's Batch API, against the emulator's
Files and Batches APIs, with images stored in a real S3 server.

What a user relies on: no synchronous call is made, one batch is created (or as many as
the limits demand), every image lands in the bucket byte for byte, the bill is half the
synchronous one, and a run stopped while it waits, then run again, pays for nothing new.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from batch_runs import batch_calls_cost, objects, run
from PIL import Image
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect_aws import S3Bucket

from prefect_gpt_image import OpenAICredentials, RapidAPICredentials, generate_images
from prefect_gpt_image._batch_api import request_line
from prefect_gpt_image._batch_jobs import BatchJobs
from prefect_gpt_image._billing import worst_case_cost
from prefect_gpt_image.errors import (
    BudgetExceededError,
    ConfigurationError,
    InvalidRequestError,
    RunFailedError,
)
from prefect_gpt_image.models import ImageRequest
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server


def prompts(count: int, tag: str = "") -> list[str]:
    tag = tag or uuid.uuid4().hex[:6]
    return [f"a paper boat number {i} on a pond, {tag}" for i in range(count)]


def test_200_prompts_go_in_one_batch_at_half_price_and_a_sync_rerun_makes_no_call(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    texts = prompts(200)

    report = run(openai_credentials, bucket, texts, limits={"max_concurrency": 16})

    assert len(report.images) == 200 and not report.failures and not report.waiting
    assert batch_api.calls == []  # not one synchronous call
    assert batch_api.stats["batches_created"] == 1
    assert len(batch_api.batch_calls) == 200
    stored = objects(s3_server, bucket)
    assert len(stored) == 200
    for data in stored.values():  # byte for byte what the API produced
        assert batch_api.served[hashlib.sha256(data).hexdigest()] == data
    synchronous = batch_calls_cost(openai_credentials, batch_api, batch=False)
    assert report.cost_usd == pytest.approx(synchronous / 2, abs=5e-4)  # micro-dollars, rounded
    assert report.synchronous_cost_usd == pytest.approx(synchronous, abs=5e-4)

    again = run(
        openai_credentials, bucket, texts, batch={"enabled": False}, limits={"max_concurrency": 16}
    )

    assert batch_api.calls == [] and len(batch_api.batch_calls) == 200
    assert again.from_cache == 200 and again.cost_usd == 0


@pytest.mark.parametrize(
    ("limit", "batches"),
    [({"batch_max_requests": 6}, 2), ({"batch_max_file_bytes": 1_000}, 4)],
    ids=["requests", "bytes"],
)
def test_a_low_limit_splits_the_requests_into_several_batches(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    limit: dict[str, int],
    batches: int,
) -> None:
    route = openai_credentials.model_copy(update=limit)

    report = run(route, bucket, prompts(10))

    assert len(report.images) == 10
    assert batch_api.stats["batches_created"] == batches
    assert len(objects(s3_server, bucket)) == 10


def test_a_run_that_stops_waiting_leaves_the_batch_to_the_next_run_which_pays_nothing_more(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    batch_api.batch_processing_seconds = 3
    texts = prompts(5)

    first = run(openai_credentials, bucket, texts, batch={"wait_minutes": 0})

    assert len(first.waiting) == 5 and not first.images and not first.failures
    assert "waiting in OpenAI batches" in first.summary()
    second = run(openai_credentials, bucket, texts)

    assert len(second.images) == 5 and not second.waiting
    assert batch_api.stats["batches_created"] == 1
    assert len(batch_api.batch_calls) == 5 and batch_api.calls == []
    assert len(objects(s3_server, bucket)) == 5


@pytest.mark.scenario
def test_a_run_killed_while_it_waits_then_run_again_creates_no_new_batch(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    user_env: dict[str, str],
) -> None:
    batch_api.batch_processing_seconds = 4
    suffix = uuid.uuid4().hex[:8]
    openai_credentials.save(f"batch-route-{suffix}")
    bucket.save(f"batch-bucket-{suffix}")
    texts = prompts(6)
    script = (
        "from prefect_gpt_image import generate_images\n"
        f"generate_images({texts!r}, bucket='batch-bucket-{suffix}', "
        f"credentials='batch-route-{suffix}', batch={{'wait_minutes': 5}})\n"
    )
    waiting = subprocess.Popen([sys.executable, "-c", script], env=user_env)
    try:
        deadline = time.monotonic() + 120
        while not batch_api.batches and time.monotonic() < deadline:
            assert waiting.poll() is None, "the run ended before it created its batch"
            time.sleep(0.2)
        assert batch_api.batches, "no batch was created"
        time.sleep(1)  # waiting for it
    finally:
        waiting.kill()
        waiting.wait()
    assert not objects(s3_server, bucket)

    report = run(openai_credentials, bucket, texts)

    assert len(report.images) == 6
    assert batch_api.stats["batches_created"] == 1
    assert batch_api.calls == [] and len(batch_api.batch_calls) == 6
    assert len(objects(s3_server, bucket)) == 6


def test_an_expired_batch_stores_what_it_answered_and_the_next_run_sends_the_rest(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    batch_api.batch_expire_after = 2
    texts = prompts(5)

    with pytest.raises(RunFailedError) as failed:
        run(openai_credentials, bucket, texts)

    report = failed.value.report
    assert len(report.images) == 2 and len(report.failures) == 3
    assert {failure.error_type for failure in report.failures} == {"BatchNotDoneError"}
    assert "sends it again" in report.failures[0].error
    assert len(objects(s3_server, bucket)) == 2  # the answered part is billed: it is kept
    assert report.cost_usd == pytest.approx(
        batch_calls_cost(openai_credentials, batch_api, batch=False) / 2
    )

    batch_api.batch_expire_after = None
    again = run(openai_credentials, bucket, texts)

    assert len(again.images) == 5 and again.generated == 3 and again.from_cache == 2
    assert batch_api.stats["batches_created"] == 2
    assert len(batch_api.batch_calls) == 5
    assert len(objects(s3_server, bucket)) == 5


def test_cancelling_stops_the_batches_and_sends_nothing_new(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    batch_api.batch_processing_seconds = 60
    texts = prompts(4)
    first = run(openai_credentials, bucket, texts, batch={"wait_minutes": 0})
    assert len(first.waiting) == 4

    with pytest.raises(RunFailedError) as failed:
        run(openai_credentials, bucket, [*texts, "one more prompt"], batch={"cancel": True})

    report = failed.value.report
    assert [batch["status"] for batch in batch_api.batches] == ["cancelled"]
    assert batch_api.stats["batches_created"] == 1
    assert len(report.failures) == 5 and not report.images and report.cost_usd == 0
    assert any("batch.cancel" in failure.error for failure in report.failures)


def test_a_prompt_the_batch_refuses_fails_alone(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    texts = [*prompts(3), "[reject] a prompt the model refuses"]

    report = run(openai_credentials, bucket, texts, allow_failures=1)

    assert len(report.images) == 3
    (failure,) = report.failures
    assert failure.error_type == "PromptRejectedError"
    assert "moderation_blocked" in failure.error


def test_the_budget_is_held_at_the_batch_price(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    texts = prompts(4)
    spec = openai_credentials.model_spec()
    synchronous_worst = sum(worst_case_cost(spec, ImageRequest(prompt=text)) for text in texts)
    cap = synchronous_worst * 0.75

    with pytest.raises(BudgetExceededError):
        run(openai_credentials, bucket, texts, batch={"enabled": False}, max_cost_usd=cap)
    report = run(openai_credentials, bucket, texts, max_cost_usd=cap)

    assert len(report.images) == 4 and report.cost_usd <= cap


def test_batch_mode_needs_an_openai_route_and_refuses_edits_before_anything_is_sent(
    batch_api: GptImageEmulator,
    credentials: RapidAPICredentials,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    tmp_path: Path,
) -> None:
    photo = tmp_path / "mug.png"
    Image.new("RGB", (64, 64), "white").save(photo)
    with pytest.raises(ConfigurationError, match="OpenAICredentials"):
        generate_images(prompts(2), bucket=bucket, credentials=credentials, batch={})
    with pytest.raises(InvalidRequestError, match="generations only"):
        generate_images(
            prompts(1),
            bucket=bucket,
            credentials=openai_credentials,
            batch={},
            edit={"images": [str(photo)]},
        )
    assert batch_api.calls == [] and not batch_api.batches


def test_a_run_stopped_between_upload_and_batch_creation_starts_that_file_once(
    batch_api: GptImageEmulator, openai_credentials: OpenAICredentials, tmp_path: Path
) -> None:
    """The pointers are written before the batch is created: the next run finds the file,
    asks the API whether a batch already runs it, and creates one only if none does."""
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)))
    requests = {
        f"gpt-image-test-{i}-{uuid.uuid4().hex}": ImageRequest(prompt=p)
        for i, p in enumerate(prompts(3))
    }
    reader = openai_credentials.get_client().batch_image
    stopped = BatchJobs(openai_credentials, store, requests, reader)
    keys = list(requests)
    lines = [request_line(key, {"model": openai_credentials.model, "prompt": "x"}) for key in keys]
    file_id = stopped._api.upload(lines, name="stopped.jsonl")
    stopped._record(keys, file_id, None)  # where a run killed before `create` left them

    first = BatchJobs(openai_credentials, store, requests, reader)
    assert first.attach() == [] and batch_api.stats["batches_created"] == 1
    second = BatchJobs(openai_credentials, store, requests, reader)
    stopped._record(keys, file_id, None)  # as if killed again, after the creation
    assert second.attach() == [] and batch_api.stats["batches_created"] == 1
    assert second.batch_ids == first.batch_ids


def test_refresh_cache_pays_for_a_new_batch_instead_of_collecting_the_last_one(
    batch_api: GptImageEmulator, openai_credentials: OpenAICredentials, bucket: S3Bucket
) -> None:
    texts = prompts(2)
    run(openai_credentials, bucket, texts)

    again = run(openai_credentials, bucket, texts, cache={"refresh": True})

    assert again.generated == 2 and again.cost_usd > 0
    assert batch_api.stats["batches_created"] == 2 and len(batch_api.batch_calls) == 4
