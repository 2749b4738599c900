"""Sending through OpenAI's Batch API: nobody pays twice, whatever the network or the
records say.

Against the emulator's Files and Batches APIs, made to misbehave as a real path does: a
batch created whose answer is lost (a proxy's 502, a dropped connection), a batch record
cut short by a kill mid-write, a 404 for a batch the API knows, and batches that belong to
another project. What a user relies on: batches created and requests billed at the
emulator, images in the bucket, and a report whose spend is what was billed, within
`max_cost_usd`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import openai
import pytest
from batch_runs import batch_calls_cost, run
from openai.types import Batch
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect_aws import S3Bucket

from prefect_gpt_image import OpenAICredentials
from prefect_gpt_image._batch_jobs import BatchPointer
from prefect_gpt_image._billing import worst_case_cost
from prefect_gpt_image.errors import RunFailedError
from prefect_gpt_image.models import ImageRequest
from prefect_gpt_image.testing import Fault, GptImageEmulator


def prompts(count: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"a kite number {i} over the dunes, {tag}" for i in range(count)]


def batch_records(texts: list[str]) -> dict[str, Path]:
    """The batch records of `texts`' requests, by prompt, in Prefect's local result storage."""
    storage = Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"])
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(storage)))
    found: dict[str, Path] = {}
    for path in storage.glob("*-batch"):
        pointer = store.read(path.name).result
        if isinstance(pointer, BatchPointer) and pointer.request.prompt in texts:
            found[pointer.request.prompt] = path
    return found


# -- finding 1: creating a batch is not idempotent --------------------------------------------


@pytest.mark.parametrize(
    "lost", [Fault.answer_lost(502), Fault.answer_lost(None)], ids=["proxy-502", "dropped"]
)
def test_a_batch_created_whose_answer_is_lost_is_found_not_created_again(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    lost: Fault,
) -> None:
    texts = prompts(3)
    spec = openai_credentials.model_spec()
    batch_worst = sum(worst_case_cost(spec, ImageRequest(prompt=text)) for text in texts) / 2
    cap = batch_worst * 1.05  # room for one batch, not two
    batch_api.add_batch_api_fault("create", lost)

    report = run(openai_credentials, bucket, texts, max_cost_usd=cap)

    assert batch_api.stats["batches_created"] == 1
    assert len(batch_api.batch_calls) == 3 and batch_api.calls == []
    assert len(report.images) == 3 and not report.failures
    billed = batch_calls_cost(openai_credentials, batch_api, batch=True)
    assert report.cost_usd == pytest.approx(billed, abs=5e-4)  # the report says what was billed
    assert billed <= cap


def test_a_create_the_api_refused_is_tried_again_after_looking_for_it(
    batch_api: GptImageEmulator, openai_credentials: OpenAICredentials, bucket: S3Bucket
) -> None:
    """A 503 before the API acted: nothing runs, so the retry creates the one batch."""
    batch_api.add_batch_api_fault("create", Fault.server_error(503))

    report = run(openai_credentials, bucket, prompts(2))

    assert len(report.images) == 2
    assert batch_api.stats["batches_created"] == 1 and len(batch_api.batch_calls) == 2


# -- finding 4: fail-open re-sends ------------------------------------------------------------


def test_a_batch_record_cut_short_asks_the_api_instead_of_sending_again(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    batch_api.batch_processing_seconds = 3
    texts = prompts(4)
    first = run(openai_credentials, bucket, texts, batch={"wait_minutes": 0})
    assert len(first.waiting) == 4
    records = batch_records(texts)
    assert len(records) == 4
    record = records[texts[1]]
    record.write_bytes(record.read_bytes()[: record.stat().st_size // 2])  # killed mid-write

    report = run(openai_credentials, bucket, texts)

    assert len(report.images) == 4 and not report.failures
    assert batch_api.stats["batches_created"] == 1
    assert len(batch_api.batch_calls) == 4  # 4 billed for 4 prompts
    assert report.cost_usd == pytest.approx(
        batch_calls_cost(openai_credentials, batch_api, batch=True), abs=5e-4
    )
    assert len(batch_records(texts)) == 4  # the record is whole again


def test_one_404_for_a_batch_the_api_knows_sends_nothing_again(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    texts = prompts(4)
    batch_api.add_batch_api_fault("retrieve", Fault.not_found())

    first = run(openai_credentials, bucket, texts)
    again = run(openai_credentials, bucket, texts)

    assert len(first.images) == 4 and not first.failures
    assert again.from_cache == 4 and again.cost_usd == 0
    assert batch_api.stats["batches_created"] == 1
    assert len(batch_api.batch_calls) == 4  # 4 billed for 4 prompts


def test_a_batch_of_another_project_is_not_sent_again_and_its_project_collects_it(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    batch_api.batch_processing_seconds = 2
    texts = prompts(4)
    ours = openai_credentials.model_copy(update={"project": "proj_creatives"})
    theirs = openai_credentials.model_copy(update={"project": "proj_other"})
    first = run(ours, bucket, texts, batch={"wait_minutes": 0})
    assert len(first.waiting) == 4

    with pytest.raises(RunFailedError) as elsewhere:
        run(theirs, bucket, texts)

    failures = elsewhere.value.report.failures
    assert len(failures) == 4 and elsewhere.value.report.cost_usd == 0
    assert "project proj_creatives" in failures[0].error
    assert "not sent again" in failures[0].error
    assert batch_api.stats["batches_created"] == 1

    collected = run(ours, bucket, texts)

    assert len(collected.images) == 4 and not collected.failures
    assert batch_api.stats["batches_created"] == 1 and len(batch_api.batch_calls) == 4


def test_a_batch_the_api_never_finds_is_reported_and_not_sent_again(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    """Three looks, at the polls' pace, each answered 404: still no proof that nothing
    runs, so the requests fail with what to do, and the next run sends nothing."""
    texts = prompts(2)
    batch_api.add_batch_api_fault("retrieve", Fault.not_found(), times=3)

    with pytest.raises(RunFailedError) as failed:
        run(openai_credentials, bucket, texts)

    failures = failed.value.report.failures
    assert len(failures) == 2 and "cache.refresh" in failures[0].error
    batch_api.add_batch_api_fault("retrieve", Fault.not_found(), times=1)
    again = run(openai_credentials, bucket, texts)  # the 404 was passing: this run collects
    assert len(again.images) == 2
    assert batch_api.stats["batches_created"] == 1 and len(batch_api.batch_calls) == 2


# -- the emulator's new faults, proved against the official client ----------------------------


def _batch(sdk: openai.OpenAI) -> str:
    line = b'{"custom_id":"a","method":"POST","url":"/v1/images/generations","body":{}}\n'
    return sdk.files.create(file=("requests.jsonl", line), purpose="batch").id


def _create(sdk: openai.OpenAI, file_id: str) -> Batch:
    return sdk.batches.create(
        input_file_id=file_id, endpoint="/v1/images/generations", completion_window="24h"
    )


def test_the_emulator_creates_a_batch_and_loses_its_answer(
    batch_api: GptImageEmulator, api_key: str
) -> None:
    with openai.OpenAI(base_url=batch_api.openai_base_url, api_key=api_key, max_retries=0) as sdk:
        file_id = _batch(sdk)
        batch_api.add_batch_api_fault("create", Fault.answer_lost(502))
        with pytest.raises(openai.InternalServerError):
            _create(sdk, file_id)
        batch_api.add_batch_api_fault("create", Fault.answer_lost(None))
        with pytest.raises(openai.APIConnectionError):
            _create(sdk, file_id)
        listed = [batch.input_file_id for batch in sdk.batches.list()]

    assert listed == [file_id, file_id]  # both were created


def test_the_emulator_answers_404_once_for_a_batch_it_knows_and_scopes_batches_by_project(
    batch_api: GptImageEmulator, api_key: str
) -> None:
    url = batch_api.openai_base_url
    with (
        openai.OpenAI(base_url=url, api_key=api_key, project="proj_a", max_retries=0) as ours,
        openai.OpenAI(base_url=url, api_key=api_key, project="proj_b", max_retries=0) as theirs,
    ):
        created = _create(ours, _batch(ours))
        batch_api.add_batch_api_fault("retrieve", Fault.not_found())
        with pytest.raises(openai.NotFoundError):
            ours.batches.retrieve(created.id)
        assert ours.batches.retrieve(created.id).id == created.id
        with pytest.raises(openai.NotFoundError):
            theirs.batches.retrieve(created.id)
        assert [batch.id for batch in theirs.batches.list()] == []


# -- one rule for "sent", on the synchronous path too -----------------------------------------


def test_a_synchronous_run_does_not_pay_for_prompts_a_batch_is_answering(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    batch_api.batch_processing_seconds = 2
    texts = prompts(3)
    first = run(openai_credentials, bucket, texts, batch={"wait_minutes": 0})
    assert len(first.waiting) == 3

    with pytest.raises(RunFailedError) as held_back:
        run(
            openai_credentials,
            bucket,
            [*texts, "a fourth kite, not in any batch"],
            batch={"enabled": False},
        )

    report = held_back.value.report
    assert len(report.images) == 1 and len(report.failures) == 3
    assert "batch on to collect it" in report.failures[0].error
    assert len(batch_api.calls) == 1  # only the prompt no batch holds was paid for
    collected = run(openai_credentials, bucket, texts)
    assert len(collected.images) == 3
    assert batch_api.stats["batches_created"] == 1 and len(batch_api.batch_calls) == 3
