"""The events a run emits for automations, read back from Prefect's events API: each once,
about its flow run, with the figures a notification needs. (Review's two events are read
in `test_review.py`.)"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from batch_runs import run
from prefect_aws import S3Bucket
from prefect_events import events_of, flow_run_id_named

from prefect_gpt_image import OpenAICredentials, RapidAPICredentials, generate_images
from prefect_gpt_image._events import BATCH_WAITING, BUDGET_EXHAUSTED, ROUTE_DROPPED
from prefect_gpt_image.errors import RunFailedError
from prefect_gpt_image.testing import Fault, GptImageEmulator


def named_run(**kwargs: Any) -> tuple[str, Any]:
    """Run the flow under a name of its own: the name, and the report or the error."""
    name = f"events-{uuid.uuid4().hex[:8]}"
    try:
        return name, generate_images.with_options(flow_run_name=name)(**kwargs)
    except RunFailedError as exc:
        return name, exc


def test_a_dropped_route_is_announced_once_with_its_reason(
    api: GptImageEmulator,
    api_key: str,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    api.models.pop("gpt-image-1.5", None)
    retired = OpenAICredentials(
        api_key=api_key, base_url=api.openai_base_url, model="gpt-image-1.5", timeout_seconds=10
    )
    prompts = [f"a dropped dunlin #{n} {uuid.uuid4().hex[:6]}" for n in range(4)]

    name, _ = named_run(
        prompts=prompts,
        bucket=bucket,
        credentials=[retired, openai_credentials],
        limits={"max_concurrency": 2},
    )

    dropped = events_of(ROUTE_DROPPED, flow_run_id_named(name))
    assert len(dropped) == 1
    payload = dropped[0]["payload"]
    assert payload["model"] == "gpt-image-1.5" and payload["error_type"] == "ModelNotFoundError"
    assert payload["fallback"] is True and payload["reason"]


def test_a_spent_budget_is_announced_once_with_the_spend(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    prompts = [f"a thrifty thrush #{n} {uuid.uuid4().hex[:6]}" for n in range(5)]
    for prompt in prompts[:2]:
        api.add_fault(Fault.malformed_body(), prompt_contains=prompt)

    name, outcome = named_run(
        prompts=prompts,
        bucket=bucket,
        credentials=credentials,
        limits={"max_concurrency": 1},
        max_cost_usd=0.15,
    )

    assert isinstance(outcome, RunFailedError)
    exhausted = events_of(BUDGET_EXHAUSTED, flow_run_id_named(name))
    assert len(exhausted) == 1
    payload = exhausted[0]["payload"]
    assert payload["max_cost_usd"] == 0.15 and payload["spent_usd"] <= 0.15
    assert payload["stopped"] == sum(
        f.error_type == "BudgetExceededError" for f in outcome.report.failures
    )


def test_prompts_left_in_a_batch_are_announced_with_the_batch(
    batch_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch_api.batch_processing_seconds = 3
    name = f"events-{uuid.uuid4().hex[:8]}"
    named = generate_images.with_options(flow_run_name=name)
    monkeypatch.setattr("batch_runs.generate_images", named)
    texts = [f"a waiting wagtail #{n} {uuid.uuid4().hex[:6]}" for n in range(3)]

    report = run(openai_credentials, bucket, texts, batch={"wait_minutes": 0})

    waiting = events_of(BATCH_WAITING, flow_run_id_named(name))
    assert len(report.waiting) == 3 and len(waiting) == 1
    payload = waiting[0]["payload"]
    assert payload["prompts"] == 3 and len(payload["batches"]) == 1
    assert payload["manifest"] == report.manifest_uri
