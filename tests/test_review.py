"""Review before publishing: a run waits for a person's decision in Prefect, publishes what
was approved, and edits what was rejected with a note, through the emulator, a real S3
server and the test harness's Prefect server (the run is paused: it runs as a script)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any
from uuid import UUID

import pytest
from batch_runs import objects
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run
from prefect_aws import S3Bucket
from prefect_events import events_of, flow_runs_named

from prefect_gpt_image import (
    OpenAICredentials,
    ReviewOptions,
    RunReport,
    _review,
    cli,
    generate_images,
)
from prefect_gpt_image._events import IMAGES_PUBLISHED, REVIEW_REQUESTED
from prefect_gpt_image._object_keys import slugify
from prefect_gpt_image.errors import ReviewTimeoutError
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server

PLACEMENTS = ["meta-feed-square", "display-medium-rectangle"]


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A paused run asks whether it was resumed every second, not every 5."""
    monkeypatch.setattr(_review, "POLL_SECONDS", 1)


class Background:
    """A flow run in a thread of its own, named so that a test can find it in Prefect."""

    def __init__(self, **kwargs: Any) -> None:
        self.name = f"review-{uuid.uuid4().hex[:8]}"
        self.outcome: RunReport | BaseException | None = None
        flow = generate_images.with_options(flow_run_name=self.name)

        def target() -> None:
            try:
                self.outcome = flow(**kwargs)
            except BaseException as exc:  # the test reads it
                self.outcome = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def paused(self, timeout: float = 120) -> UUID:
        """The run's id, once it waits for input."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run in flow_runs_named(self.name):
                if run.state and run.state.is_paused():
                    return run.id
            assert self.thread.is_alive(), self.outcome
            time.sleep(0.2)
        raise AssertionError(f"{self.name} did not pause")

    def report(self, timeout: float = 120) -> RunReport:
        self.thread.join(timeout)
        assert isinstance(self.outcome, RunReport), self.outcome
        return self.outcome


def wait_until_resumed_and_paused_again(
    background: Background, run_id: UUID, key: str, timeout: float = 120
) -> None:
    """Wait until the run asks for input under `key`: its schema is saved."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_paused():
                try:
                    client.read_flow_run_input(run_id, f"paused-{key}-schema")
                    return
                except Exception:
                    pass
            assert background.thread.is_alive(), background.outcome
            time.sleep(0.2)
    raise AssertionError(f"the run did not wait under {key}")


def form_schema(run_id: UUID, key: str) -> dict[str, Any]:
    with get_client(sync_client=True) as client:
        return dict(json.loads(client.read_flow_run_input(run_id, f"paused-{key}-schema")))


def manifest(s3: LocalS3Server, bucket: S3Bucket, report: RunReport) -> list[dict[str, Any]]:
    client = s3.boto3_client()
    assert report.manifest_key is not None
    body = client.get_object(Bucket=bucket.bucket_name, Key=report.manifest_key)["Body"]
    return [json.loads(line) for line in body.read().decode().splitlines()]


def published(stored: dict[str, bytes], prefix: str = "published/") -> dict[str, bytes]:
    return {
        key.removeprefix(prefix): data for key, data in stored.items() if key.startswith(prefix)
    }


@pytest.fixture
def prompts() -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [
        f"a ceramic mug on an oak table, {tag}",
        f"a linen tote bag on a beach, {tag}",
        f"a steel bottle on a trail, {tag}",
    ]


def test_approved_images_are_published_a_rejected_one_is_revised_and_a_dropped_one_is_not(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    prompts: list[str],
) -> None:
    background = Background(
        prompts=prompts,
        bucket=bucket,
        credentials=openai_credentials,
        placements=PLACEMENTS,
        review=ReviewOptions(max_rounds=2),
    )
    run_id = background.paused()
    stored = objects(s3_server, bucket)
    masters = sorted(key for key in stored if "-meta-" not in key and "-display-" not in key)
    assert len(masters) == 3 and not published(stored)  # nothing published while waiting
    mug, bag, bottle = (
        next(key for key in masters if key.startswith(slugify(prompt)[:20])) for prompt in prompts
    )

    # The form opens with every image approved, named as the gallery names them.
    schema = form_schema(run_id, "review-1-0")
    assert sorted(schema["properties"]["approved"]["default"]) == masters
    assert api.billed == 3

    resume_flow_run(
        run_id,
        run_input={
            "approved": [mug],
            "rejected": {bag: "make the bag blue", bottle: ""},
        },
    )
    wait_until_resumed_and_paused_again(background, run_id, "review-2-0")

    # The rejected image was edited with its prompt and the note, once.
    edits = [call for call in api.calls if "edits" in call.path and call.status == 200]
    assert len(edits) == 1 and "make the bag blue" in edits[0].prompt
    assert prompts[1] in edits[0].prompt and api.billed == 4
    revised = form_schema(run_id, "review-2-0")["properties"]["approved"]["default"]
    assert len(revised) == 1 and revised[0] not in masters

    resume_flow_run(run_id, run_input={"approve_all": True})
    report = background.report()

    stored = objects(s3_server, bucket)
    out = published(stored)
    # The mug and the bag's new version, each with its two renditions, byte for byte.
    assert api.billed == 4
    for name in [mug, revised[0]]:
        assert out[name] == stored[name]
    renditions = [name for name in out if name not in (mug, revised[0])]
    assert len(out) == 6 and len(renditions) == 4
    assert all(out[name] == stored[name] for name in out)
    assert bag not in out and bottle not in out

    lines = manifest(s3_server, bucket, report)
    decided = {line["reviewed_as"]: line for line in lines if line.get("placement") is None}
    assert decided[mug]["decision"] == "approved" and decided[mug]["round"] == 1
    assert decided[bag]["decision"] == "rejected" and decided[bag]["note"] == "make the bag blue"
    assert decided[bottle]["decision"] == "dropped" and decided[bottle]["published_uri"] is None
    assert decided[revised[0]]["decision"] == "approved" and decided[revised[0]]["round"] == 2
    assert decided[mug]["published_uri"].endswith(f"/published/{mug}")
    assert all(line["decided_at"] for line in decided.values())

    requested = events_of(REVIEW_REQUESTED, run_id, at_least=2)
    assert sorted(event["payload"]["round"] for event in requested) == [1, 2]
    announced = events_of(IMAGES_PUBLISHED, run_id)
    assert len(announced) == 1 and announced[0]["payload"]["published"] == 6


def test_a_decision_naming_an_image_the_run_does_not_have_is_refused_and_the_run_waits_again(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    prompts: list[str],
) -> None:
    background = Background(
        prompts=prompts[:2],
        bucket=bucket,
        credentials=openai_credentials,
        review=ReviewOptions(max_rounds=1),
    )
    run_id = background.paused()

    resume_flow_run(run_id, run_input={"approved": ["not-an-image.png"]})
    wait_until_resumed_and_paused_again(background, run_id, "review-1-1")

    assert not published(objects(s3_server, bucket))  # never a partial guess
    resume_flow_run(run_id, run_input={"approve_all": True})
    background.report()
    assert len(published(objects(s3_server, bucket))) == 2


def test_without_a_decision_in_time_nothing_is_published_and_the_run_says_how_to_publish(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    prompts: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ReviewTimeoutError, match="prefect-gpt-image publish s3://") as caught:
        generate_images(
            prompts[:2],
            bucket=bucket,
            credentials=openai_credentials,
            review=ReviewOptions(timeout_hours=1 / 3600),
        )

    stored = objects(s3_server, bucket)
    assert len(stored) == 2 and not published(stored)  # every image kept
    assert "No review decision came within" in str(caught.value)

    # Later, from the command line, with the AWS_* environment's credentials: a name the run
    # does not have publishes nothing...
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    manifest_uri = str(caught.value).split("publish ", 1)[1].split()[0]
    names = sorted(stored)
    capsys.readouterr()
    assert cli.main(["publish", manifest_uri, "--approve", "nope.png"]) == 2
    refused = capsys.readouterr().err
    assert all(name in refused for name in names), refused
    assert not published(objects(s3_server, bucket))

    # ... and a name it has publishes that image, and records the decision.
    assert cli.main(["publish", manifest_uri, "--approve", names[0]]) == 0
    stored = objects(s3_server, bucket)
    assert published(stored) == {names[0]: stored[names[0]]}
    _, key = manifest_uri.removeprefix("s3://").split("/", 1)
    body = s3_server.boto3_client().get_object(Bucket=bucket.bucket_name, Key=key)["Body"]
    lines = {
        line["reviewed_as"]: line
        for line in map(json.loads, body.read().splitlines())
        if "reviewed_as" in line
    }
    assert list(lines) == [names[0]] and lines[names[0]]["decision"] == "approved"


def test_a_review_that_could_not_edit_a_rejection_is_refused_before_paying(
    api: GptImageEmulator,
    credentials: Any,
    bucket: S3Bucket,
    prompts: list[str],
) -> None:
    with pytest.raises(Exception, match="max_rounds=1"):
        generate_images(prompts, bucket=bucket, credentials=credentials, review=ReviewOptions())
    assert api.calls == []
