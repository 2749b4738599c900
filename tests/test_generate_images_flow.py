"""The flow, end to end: emulator → Prefect → real S3 server."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.exceptions import ParameterTypeError
from prefect_aws import S3Bucket

from prefect_gpt_image import (
    ApiLimits,
    BatchOptions,
    CacheOptions,
    EditOptions,
    ImageOptions,
    ImageRequest,
    LinkOptions,
    PromptTemplate,
    RapidAPICredentials,
    RunReport,
    generate_image,
    generate_images,
)
from prefect_gpt_image._caching import cache_store, fallback_store, is_fallback
from prefect_gpt_image.errors import InvalidRequestError, RunFailedError
from prefect_gpt_image.testing import Fault, GptImageEmulator, LocalS3Server

MIXED_PROMPTS = [
    "a red fox in fresh snow, wildlife photo",
    "a glass greenhouse full of ferns",
    "[reject] a prompt the model refuses",
    "a red fox in fresh snow, wildlife photo",  # a duplicate: generated once
    "Ein Leuchtturm im Sturm, Ölgemälde",
    "桜の木の下の猫、水彩画",
    "a lighthouse keeper's cottage at dusk",
]


def read_object(s3: LocalS3Server, bucket: S3Bucket, key: str) -> dict[str, Any]:
    answer = s3.boto3_client().get_object(Bucket=bucket.bucket_name, Key=key)
    return {**answer, "Body": answer["Body"].read()}


def manifest_lines(s3: LocalS3Server, bucket: S3Bucket, report: RunReport) -> list[dict]:
    assert report.manifest_key
    body = read_object(s3, bucket, report.manifest_key)["Body"]
    return [json.loads(line) for line in body.decode().splitlines()]


def test_a_mixed_prompt_set_stores_every_good_image_and_fails_only_the_rejected_one(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    api.add_fault(Fault.rate_limited(retry_after=1), prompt_contains="greenhouse")
    api.add_fault(Fault.server_error(503), prompt_contains="Leuchtturm")
    api.add_fault(Fault.malformed_body(), prompt_contains="cottage")

    report = generate_images(
        MIXED_PROMPTS, bucket=bucket, credentials=credentials, prefix="winter", allow_failures=1
    )

    # One failure, the rejected prompt, with the reason a user can act on.
    (failure,) = report.failures
    assert failure.prompt == MIXED_PROMPTS[2]
    assert failure.error_type == "PromptRejectedError"
    assert "refused the prompt" in failure.error

    # Every other prompt is stored, byte for byte what the API served.
    assert [image.prompt for image in report.images] == [
        p for p in MIXED_PROMPTS if not p.startswith("[reject]")
    ]
    for image in report.images:
        stored = read_object(s3_server, bucket, image.key)
        assert stored["Body"] == api.served[image.sha256]
        assert stored["ContentType"] == "image/png"
        assert (
            image.key.startswith("winter/")
            and image.uri == f"s3://{bucket.bucket_name}/{image.key}"
        )

    # The duplicate was generated once and stored once; faults were retried.
    assert api.billed_for(MIXED_PROMPTS[0]) == 1
    assert report.images[0].key == report.images[2].key
    assert report.generated == 5 and report.from_cache == 0
    # The broken answer was charged too, and the report says so: what the API billed.
    assert api.billed == 6
    assert report.cost_usd == pytest.approx(api.billed * 0.03)
    assert len(api.calls) == 5 + 1 + 3  # 5 images, 1 rejection, 3 faults retried

    # The manifest lists every prompt, in order, beside the images.
    assert report.manifest_key and report.manifest_key.startswith("winter/manifest-")
    lines = manifest_lines(s3_server, bucket, report)
    assert [line["prompt"] for line in lines] == MIXED_PROMPTS
    assert [line["status"] for line in lines] == ["stored"] * 2 + ["failed"] + ["stored"] * 4
    assert lines[2]["error_type"] == "PromptRejectedError"
    assert lines[5]["prompt"] == "桜の木の下の猫、水彩画"


def test_second_run_with_another_prefix_calls_the_api_zero_times(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    prompts = ["a copper kettle", "a linen tablecloth", "a bowl of figs"]
    first = generate_images(prompts, bucket=bucket, credentials=credentials, prefix="run-1")
    calls_after_first = len(api.calls)

    other_bucket = s3_server.bucket_block(bucket.bucket_name + "-b", bucket_folder="archive")
    second = generate_images(prompts, bucket=other_bucket, credentials=credentials, prefix="run-2")

    assert calls_after_first == 3
    assert len(api.calls) == 3
    assert (second.generated, second.from_cache, second.cost_usd) == (0, 3, 0.0)
    for before, after in zip(first.images, second.images, strict=True):
        assert after.key == "archive/run-2/" + before.key.removeprefix("run-1/")
        assert read_object(s3_server, other_bucket, after.key)["Body"] == api.served[before.sha256]


def test_too_many_failures_fail_the_run_after_storing_the_rest(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    prompts = ["a good gannet", "[reject] a bad one", "a good guillemot"]
    with pytest.raises(RunFailedError) as raised:
        generate_images(prompts, bucket=bucket, credentials=credentials)

    message = str(raised.value)
    assert "1 of 3 prompts failed (allow_failures=0)" in message
    assert "[reject] a bad one" in message and "refused the prompt" in message
    report = raised.value.report
    assert isinstance(report, RunReport)
    assert [image.prompt for image in report.images] == ["a good gannet", "a good guillemot"]
    for image in report.images:
        assert read_object(s3_server, bucket, image.key)["Body"] == api.served[image.sha256]
    assert report.manifest_uri and report.manifest_uri in message


def test_failed_run_is_failed_in_prefect(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    state = generate_images(
        ["[reject] nothing good"], bucket=bucket, credentials=credentials, return_state=True
    )
    assert state.is_failed()
    assert "1 of 1 prompts failed" in state.message


def test_object_metadata_keeps_non_ascii_prompts(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    request = ImageRequest(prompt="Crème brûlée au café — 東京, 2026", name="Dessert № 1")
    report = generate_images([request], bucket=bucket, credentials=credentials)

    (image,) = report.images
    stored = read_object(s3_server, bucket, image.key)
    # rclone returns metadata keys Title-Cased; S3 itself lower-cases them.
    metadata = {k.lower(): v for k, v in stored["Metadata"].items()}
    assert urllib.parse.unquote(metadata["prompt"]) == request.prompt
    assert urllib.parse.unquote(metadata["name"]) == "Dessert № 1"
    assert metadata["model"] == credentials.model
    assert metadata["size"] == "1024x1024"
    assert metadata["sha256"] == image.sha256
    assert image.key.startswith("dessert-no-1-")


def test_same_image_uploaded_again_is_not_rewritten(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    first = generate_images(["a quiet quay"], bucket=bucket, credentials=credentials)
    path = s3_server.object_path(bucket.bucket_name, first.images[0].key)
    written_at = path.stat().st_mtime_ns

    second = generate_images(["a quiet quay"], bucket=bucket, credentials=credentials)

    assert second.images[0].key == first.images[0].key
    assert path.stat().st_mtime_ns == written_at


def test_names_make_separate_objects_from_one_generation(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    prompts = [
        ImageRequest(prompt="a shared sunrise", name="homepage hero"),
        ImageRequest(prompt="a shared sunrise", name="newsletter banner"),
    ]
    report = generate_images(prompts, bucket=bucket, credentials=credentials)

    assert len(api.calls) == 1
    keys = [image.key for image in report.images]
    assert keys[0].startswith("homepage-hero-") and keys[1].startswith("newsletter-banner-")
    assert report.images[0].sha256 == report.images[1].sha256


@pytest.mark.parametrize(
    ("filename", "content"),
    [
        ("prompts.txt", "# campaign\na txt tulip\n\na txt tortoise\n"),
        ("prompts.csv", "prompt,name,extras.quality\na csv tulip,tulip,high\na csv tortoise,,\n"),
        ("prompts.jsonl", '{"prompt": "a jsonl tulip", "width": 1536}\n"a jsonl tortoise"\n'),
    ],
)
def test_prompt_files_local_and_on_s3(
    filename: str,
    content: str,
    tmp_path: Path,
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    local = tmp_path / filename
    local.write_text(content, encoding="utf-8")
    from_disk = generate_images(str(local), bucket=bucket, credentials=credentials)

    s3_server.boto3_client().put_object(
        Bucket=bucket.bucket_name, Key=f"inputs/{filename}", Body=content.encode()
    )
    from_s3 = generate_images(
        f"s3://{bucket.bucket_name}/inputs/{filename}", bucket=bucket, credentials=credentials
    )

    assert len(from_disk.images) == 2
    assert [i.key for i in from_s3.images] == [i.key for i in from_disk.images]
    assert from_s3.from_cache == 2
    assert len(api.calls) == 2
    if filename.endswith(".csv"):
        assert api.calls_for("a csv tulip")[0].body["quality"] == "high"
        assert from_disk.images[0].key.startswith("tulip-")
    if filename.endswith(".jsonl"):
        assert from_disk.images[0].width == 1536


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        (["fine", "   "], {}, "prompt #2: prompt: the prompt is empty"),
        (["fine", "bell\x07"], {}, "control character"),
        ([ImageRequest(prompt="fine", width=1000)], {}, "cannot make 1000x1024"),
        (["fine"], {"prefix": "../escape"}, "is not a safe S3 folder"),
        ("prompts.docx", {}, "is not a prompt file"),
        ([], {}, "The prompt set is empty"),
        (PromptTemplate(template="a {product}"), {}, "{product}, which has no values"),
        (
            PromptTemplate(template="a {x}", variables={"x": ["1"], "y": ["2"]}),
            {},
            "'y' is not used",
        ),
        (
            PromptTemplate(template="a {product}", variables={"product": []}),
            {},
            "has no values",
        ),
        (PromptTemplate(template="no fields"), {}, "has no {variable}"),
        (PromptTemplate(template="a {0}"), {}, "plain names"),
        (PromptTemplate(template="a {x", variables={"x": ["y"]}), {}, "not valid"),
        (
            PromptTemplate(template="{a}{b}", variables={"a": ["1"] * 200, "b": ["2"] * 100}),
            {},
            "expands to 20,000 prompts",
        ),
    ],
)
def test_bad_input_is_refused_before_any_paid_call(
    prompts: Any,
    kwargs: dict[str, Any],
    message: str,
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        generate_images(prompts, bucket=bucket, credentials=credentials, **kwargs)
    assert api.calls == []


def test_max_concurrency_bounds_calls_in_flight(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    api.latency = 0.3
    prompts = [f"a concurrent crane #{n}" for n in range(12)]
    report = generate_images(
        prompts, bucket=bucket, credentials=credentials, limits={"max_concurrency": 3}
    )

    assert len(report.images) == 12
    assert api.peak_concurrency == 3


def test_a_cached_image_is_stored_under_the_new_name(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    first = generate_images(
        [ImageRequest(prompt="a renamed rose", name="old name")],
        bucket=bucket,
        credentials=credentials,
    )
    second = generate_images(
        [ImageRequest(prompt="a renamed rose", name="new name")],
        bucket=bucket,
        credentials=credentials,
    )

    assert second.from_cache == 1 and len(api.calls) == 1
    assert first.images[0].key.startswith("old-name-")
    assert second.images[0].key.startswith("new-name-")
    assert second.images[0].name == "new name"


def test_a_rerun_records_stored_images_without_task_runs(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    prompts = ["a pewter jug", "a wicker basket", "a slate roof"]
    first = generate_images(prompts, bucket=bucket, credentials=credentials, prefix="shelf")
    lost = first.images[1]
    s3_server.boto3_client().delete_object(Bucket=bucket.bucket_name, Key=lost.key)

    state = generate_images(
        prompts, bucket=bucket, credentials=credentials, prefix="shelf", return_state=True
    )
    second = state.result()

    assert len(api.calls) == 3  # the first run's
    assert (second.generated, second.from_cache) == (0, 3)
    assert [i.key for i in second.images] == [i.key for i in first.images]
    assert read_object(s3_server, bucket, lost.key)["Body"] == api.served[lost.sha256]
    # Only the lost image took a task run (a cached generation, then its upload); the
    # two still in the bucket were recorded from the cache and a listing.
    names = _task_run_names(state.state_details.flow_run_id, expected=1)
    assert names == ["generate-a-wicker-basket"]


def _task_run_names(flow_run_id: Any, expected: int) -> list[str]:
    """The flow run's task runs, as Prefect's API records them (a moment after they end)."""
    deadline = time.monotonic() + 20
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if len(runs) >= expected and all(r.state and r.state.is_final() for r in runs):
                time.sleep(1)  # and nothing more arrives
                runs = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
                )
                return [r.name for r in runs]
            if time.monotonic() > deadline:
                return [r.name for r in runs]
            time.sleep(0.2)


def test_the_default_cache_is_where_paid_images_fall_back_to_so_a_run_looks_once() -> None:
    @flow
    def stores() -> tuple[bool, bool]:
        return is_fallback(cache_store(generate_image)), is_fallback(fallback_store())

    assert stores() == (True, True)


# -- the option groups ------------------------------------------------------------------------

GROUPS_AS_MAPPINGS: dict[str, Any] = {
    "image": {"size": "1536x1024", "quality": "high"},
    "edit": {},
    "batch": {"enabled": False},
    "limits": {"max_concurrency": 2},
    "cache": {"expiration_days": 1},
    "links": {"expiry_hours": 2},
}
GROUPS_AS_MODELS: dict[str, Any] = {
    "image": ImageOptions(size="1536x1024", quality="high"),
    "edit": EditOptions(),
    "batch": BatchOptions(enabled=False),
    "limits": ApiLimits(max_concurrency=2),
    "cache": CacheOptions(expiration_days=1),
    "links": LinkOptions(expiry_hours=2),
}


@pytest.mark.parametrize("groups", [GROUPS_AS_MAPPINGS, GROUPS_AS_MODELS], ids=["dicts", "models"])
def test_a_run_takes_every_option_group_as_a_mapping_or_as_its_model(
    groups: dict[str, Any],
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    api.latency = 0.3
    prompts = [f"a grouped grebe #{n}" for n in range(4)]
    report = generate_images(prompts, bucket=bucket, credentials=credentials, **groups)

    assert len(api.calls) == api.billed == 4
    assert {(c.body["quality"], c.body["width"], c.body["height"]) for c in api.calls} == {
        ("high", 1536, 1024)
    }
    assert api.peak_concurrency == 2
    assert [image.prompt for image in report.images] == prompts
    for image in report.images:
        assert (image.width, image.height) == (1536, 1024)
        assert read_object(s3_server, bucket, image.key)["Body"] == api.served[image.sha256]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"image": {"qualty": "high"}}, "qualty"),
        ({"edit": {"image": "s3://brand/mug.png"}}, "image"),
        ({"batch": {"wait_minute": 0}}, "wait_minute"),
        ({"limits": {"max_concurency": 2}}, "max_concurency"),
        ({"cache": {"refresh_cache": True}}, "refresh_cache"),
        ({"links": {"public_url": "https://cdn.example.com/"}}, "public_url"),
    ],
)
def test_a_misspelt_option_is_refused_by_name_before_anything_is_paid(
    options: dict[str, Any],
    field: str,
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
) -> None:
    with pytest.raises(ParameterTypeError) as refused:
        generate_images(["a misspelt merlin"], bucket=bucket, credentials=credentials, **options)

    (group,) = options
    assert f"{group}.{field}" in str(refused.value)
    assert "Extra inputs are not permitted" in str(refused.value)
    assert api.calls == [] and api.billed == 0


def table_links(flow_run_id: Any) -> list[str]:
    """The links in a run's table artifact: what a user clicks on the run page."""
    with get_client(sync_client=True) as client:
        (table,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=["gpt-image-run"]),
            )
        )
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    return [row["link"] for row in rows]


def test_the_environment_gives_the_links_base_url_and_a_runs_own_wins(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPT_IMAGE_PUBLIC_BASE_URL", "https://cdn.example.com/")

    pooled = generate_images(
        ["a linked lapwing"], bucket=bucket, credentials=credentials, return_state=True
    )
    own = generate_images(
        ["a linked lapwing"],
        bucket=bucket,
        credentials=credentials,
        links={"public_base_url": "https://other.example.com/"},
        return_state=True,
    )

    (link,) = table_links(pooled.state_details.flow_run_id)
    assert link.startswith("https://cdn.example.com/a-linked-lapwing-")
    (link,) = table_links(own.state_details.flow_run_id)
    assert link.startswith("https://other.example.com/a-linked-lapwing-")


def test_the_environment_gives_the_concurrency_and_a_form_default_does_not_replace_it(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prefect's run form sends back every default it shows: `max_concurrency=8` from the
    form is no choice, and the work pool's setting stands."""
    monkeypatch.setenv("GPT_IMAGE_MAX_CONCURRENCY", "1")
    api.latency = 0.2

    generate_images(
        [f"a lone loon #{n}" for n in range(3)],
        bucket=bucket,
        credentials=credentials,
        limits={"max_concurrency": ApiLimits().max_concurrency},
    )
    assert (len(api.calls), api.peak_concurrency) == (3, 1)

    api.reset()
    api.latency = 0.2
    generate_images(
        [f"a flock of loons #{n}" for n in range(4)],
        bucket=bucket,
        credentials=credentials,
        limits={"max_concurrency": 2},
    )
    assert (len(api.calls), api.peak_concurrency) == (4, 2)


def test_the_environment_gives_the_cache_storage_and_a_runs_own_wins(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def cached(folder: str) -> set[str]:
        root = s3_server.object_path(bucket.bucket_name, folder)
        return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()

    suffix = uuid.uuid4().hex[:6]
    s3_server.bucket_block(bucket.bucket_name, bucket_folder="team-cache").save(
        f"team-cache-{suffix}"
    )
    s3_server.bucket_block(bucket.bucket_name, bucket_folder="own-cache").save(
        f"own-cache-{suffix}"
    )
    monkeypatch.setenv("GPT_IMAGE_CACHE_STORAGE", f"team-cache-{suffix}")

    generate_images(["a pooled plover"], bucket=bucket, credentials=credentials)
    in_team_cache = cached("team-cache")
    assert len(in_team_cache) == 1 and cached("own-cache") == set()

    generate_images(
        ["an own oystercatcher"],
        bucket=bucket,
        credentials=credentials,
        cache={"storage": f"own-cache-{suffix}"},
    )
    assert cached("team-cache") == in_team_cache and len(cached("own-cache")) == 1
    assert len(api.calls) == 2

    # Another machine of the same pool, with an empty bucket of its own, reads the
    # team's cache and pays nothing.
    elsewhere = s3_server.bucket_block(f"{bucket.bucket_name}-b")
    again = generate_images(["a pooled plover"], bucket=elsewhere, credentials=credentials)
    assert (again.generated, again.from_cache, len(api.calls)) == (0, 1, 2)
