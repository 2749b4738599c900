"""Every route to the model and its successors: the OpenAI protocol, fallback between
routes, the model table, and the exact price of every image.

The providers themselves cannot be reached from tests: the emulator speaks both their
protocols on loopback, and the official `openai` package is checked against it in
test_emulator_openai.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prefect import flow
from prefect_aws import S3Bucket
from pydantic import SecretStr

from prefect_gpt_image import (
    ImageRequest,
    ModelSpec,
    OpenAICredentials,
    RapidAPICredentials,
    generate_image,
    generate_images,
    upload_image,
)
from prefect_gpt_image.errors import (
    ConfigurationError,
    InvalidRequestError,
    ModelNotFoundError,
    NoRouteLeftError,
    PromptRejectedError,
    RunFailedError,
)
from prefect_gpt_image.model_table import MODELS
from prefect_gpt_image.testing import Fault, GptImageEmulator, LocalS3Server

SCHEMA = json.loads((Path(__file__).parent / "data" / "openai-images-schema.json").read_text())
fast_generate = generate_image.with_options(retry_delay_seconds=0)


def usage_cost(usage: dict[str, Any], model: str) -> float:
    """What OpenAI bills for a call's usage, from the published token prices."""
    prices = MODELS[model].token_prices
    assert prices is not None
    text = usage["input_tokens_details"]["text_tokens"]
    return (text * prices.text_input + usage["output_tokens"] * prices.image_output) / 1e6


def objects_in(s3: LocalS3Server, bucket: S3Bucket) -> dict[str, bytes]:
    root = s3.object_path(bucket.bucket_name, "")
    return {p.name: p.read_bytes() for p in root.rglob("*") if p.suffix != ".jsonl" and p.is_file()}


@pytest.fixture
def retired(api: GptImageEmulator, api_key: str) -> OpenAICredentials:
    """A route whose model the provider has retired: it answers 404 model_not_found."""
    api.models.pop("gpt-image-1.5", None)
    return OpenAICredentials(
        api_key=api_key, base_url=api.openai_base_url, model="gpt-image-1.5", timeout_seconds=10
    )


@pytest.fixture
def second_api(api_key: str) -> Iterator[GptImageEmulator]:
    """Another provider: a second emulator on its own port."""
    with GptImageEmulator(api_key=api_key) as server:
        yield server


def test_a_retired_model_falls_back_to_the_next_route(
    api: GptImageEmulator,
    retired: OpenAICredentials,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    prompts = [f"a migrating crane #{n}" for n in range(6)]

    report = generate_images(
        prompts,
        bucket=bucket,
        credentials=[retired, openai_credentials],
        limits={"max_concurrency": 2},
    )

    # Every image went through the second route; the first was called at most once per
    # request in flight before it was dropped.
    assert len(report.images) == 6 and not report.failures
    first_calls = [c for c in api.calls if c.model == "gpt-image-1.5"]
    assert 1 <= len(first_calls) <= 2
    assert all(c.status == 404 for c in first_calls)
    host = f"127.0.0.1:{api.base_url.rsplit(':', 1)[1]}"
    billed = {c.prompt: c for c in api.calls if c.status == 200}
    for image in report.images:
        assert (image.route, image.model) == (host, openai_credentials.model)
        call = billed[image.prompt]
        assert image.cost_usd == pytest.approx(usage_cost(call.usage or {}, "gpt-image-2"))
        stored = s3_server.object_path(bucket.bucket_name, image.key).read_bytes()
        assert stored == api.served[image.sha256]
    assert report.cost_usd == pytest.approx(sum(i.cost_usd for i in report.images))
    manifest = s3_server.object_path(bucket.bucket_name, report.manifest_key or "").read_text()
    rows = [json.loads(line) for line in manifest.splitlines()]
    assert {(r["route"], r["model"]) for r in rows} == {(host, openai_credentials.model)}
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(report.cost_usd)

    # The same prompts again cost nothing on either route.
    api.reset()
    again = generate_images(prompts, bucket=bucket, credentials=[retired, openai_credentials])
    assert (len(again.images), again.from_cache, again.cost_usd) == (6, 6, 0.0)
    assert api.calls == []


def test_a_rapidapi_route_that_is_gone_falls_back_to_openai(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    gone = credentials.model_copy(update={"api_host": "gpt-image-1-5-retired.p.rapidapi.com"})

    report = generate_images(
        ["a heron at dusk", "a heron at dawn"],
        bucket=bucket,
        credentials=[gone, openai_credentials],
        limits={"max_concurrency": 1},
    )

    assert [i.model for i in report.images] == [openai_credentials.model] * 2
    assert [c.status for c in api.calls] == [404, 200, 200]


def test_the_cache_of_any_route_serves_a_request(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    """An image made through the second route of a list is found by a later run that
    names that route alone, and the other way round."""
    generate_images(
        ["a cached cormorant"],
        bucket=bucket,
        credentials=[
            credentials.model_copy(update={"api_host": "nowhere.example"}),
            openai_credentials,
        ],
    )
    api.reset()

    alone = generate_images(["a cached cormorant"], bucket=bucket, credentials=openai_credentials)

    assert (alone.from_cache, alone.cost_usd) == (1, 0.0)
    assert api.calls == []


def test_a_refused_prompt_is_not_sent_to_the_next_route(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
) -> None:
    api.add_fault(Fault.moderation_blocked())

    with pytest.raises(RunFailedError) as raised:
        generate_images(
            ["a contentious cuckoo"], bucket=bucket, credentials=[openai_credentials, credentials]
        )

    (failure,) = raised.value.report.failures
    assert failure.error_type == PromptRejectedError.__name__
    assert len(api.calls) == 1


def test_a_spent_quota_drops_the_route(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
) -> None:
    api.add_fault(Fault.insufficient_quota())

    report = generate_images(
        ["a frugal finch", "a frugal wren"],
        bucket=bucket,
        credentials=[openai_credentials, credentials],
        limits={"max_concurrency": 1},
    )

    assert [i.model for i in report.images] == [credentials.model] * 2
    assert [(c.path.endswith("/generations"), c.status) for c in api.calls] == [
        (True, 429),
        (False, 200),
        (False, 200),
    ]
    # RapidAPI's flat price, not OpenAI's.
    assert report.cost_usd == pytest.approx(0.06)


def test_when_every_route_is_gone_one_message_names_each(
    api: GptImageEmulator,
    retired: OpenAICredentials,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
) -> None:
    revoked = credentials.model_copy(update={"api_key": SecretStr("revoked-key")})

    with pytest.raises(RunFailedError) as raised:
        generate_images(
            [f"a lost lark #{n}" for n in range(5)],
            bucket=bucket,
            credentials=[retired, revoked],
            limits={"max_concurrency": 1},
        )

    message = str(raised.value)
    assert "Every route was dropped" in message
    assert "ModelNotFoundError" in message and "AuthenticationError" in message
    assert len(api.calls) == 2
    assert revoked.api_key.get_secret_value() not in message


def test_a_route_down_through_the_retry_budget_is_dropped(
    api: GptImageEmulator,
    second_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
) -> None:
    second = openai_credentials.model_copy(update={"base_url": second_api.openai_base_url})
    second_api.models[openai_credentials.model] = None
    api.add_fault(Fault.server_error(503), times=100)

    @flow
    def one() -> Any:
        return fast_generate("a patient pelican", [openai_credentials, second])

    image = one()

    assert image.route == f"127.0.0.1:{second_api.base_url.rsplit(':', 1)[1]}"
    assert len(api.calls) == 5  # the whole retry budget of one request
    assert len(second_api.calls) == 1


def test_every_request_is_checked_against_every_route_before_paying(
    api: GptImageEmulator,
    retired: OpenAICredentials,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    wide = ImageRequest(prompt="a wide-angle avocet", width=1536, height=864)

    report = generate_images([wide], bucket=bucket, credentials=openai_credentials)
    assert (report.images[0].width, report.images[0].height) == (1536, 864)

    api.reset()
    with pytest.raises(InvalidRequestError, match=r"gpt-image-1\.5 .* cannot make 1536x864"):
        generate_images([wide], bucket=bucket, credentials=[openai_credentials, retired])
    for size, rule in [("1000x1000", "multiples of 16"), ("3840x1200", "aspect ratio")]:
        with pytest.raises(InvalidRequestError, match=rule):
            generate_images(
                ["an odd-sized owl"],
                bucket=bucket,
                credentials=openai_credentials,
                image={"size": size},
            )
    # gpt-image-2's transparent backgrounds are a preview: a block that takes them says so.
    preview = MODELS["gpt-image-2"].model_copy(update={"transparent_formats": ["png", "webp"]})
    with pytest.raises(InvalidRequestError, match="transparent backgrounds only as png or webp"):
        generate_images(
            [ImageRequest(prompt="a clear crow", background="transparent", output_format="jpeg")],
            bucket=bucket,
            credentials=openai_credentials.model_copy(
                update={"models": {openai_credentials.model: preview}}
            ),
        )
    assert api.calls == []


def test_n_stores_every_image_and_bills_every_image(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    report = generate_images(
        ["three takes of a tern"], bucket=bucket, credentials=openai_credentials, image={"n": 3}
    )

    assert len(report.images) == 3
    assert len({i.sha256 for i in report.images}) == 3
    (call,) = api.calls
    assert call.body["n"] == 3 and api.billed_images == 3
    assert report.cost_usd == pytest.approx(usage_cost(call.usage or {}, "gpt-image-2"))
    assert sorted(objects_in(s3_server, bucket).values()) == sorted(
        api.served[i.sha256] for i in report.images
    )


def test_n_in_extras_is_typed_and_every_image_is_stored(
    api: GptImageEmulator, openai_credentials: OpenAICredentials, bucket: S3Bucket
) -> None:
    request = ImageRequest(prompt="a pair of puffins", extras={"n": 2, "style_hint": "x"})
    assert (request.n, request.extras) == (2, {"style_hint": "x"})

    api.models[openai_credentials.model] = None
    report = generate_images(
        [ImageRequest(prompt="a pair of puffins", extras={"n": 2})],
        bucket=bucket,
        credentials=openai_credentials,
    )

    assert len(report.images) == 2 and api.billed_images == 2


def test_the_routes_requests_are_valid_against_openais_schema(
    api: GptImageEmulator, openai_credentials: OpenAICredentials, bucket: S3Bucket
) -> None:
    generate_images(
        [
            ImageRequest(
                prompt="a schema-valid swift",
                width=1536,
                height=1024,
                quality="low",
                n=2,
                output_format="webp",
                output_compression=80,
                background="opaque",
                moderation="low",
            ),
            "a plain pipit",
        ],
        bucket=bucket,
        credentials=openai_credentials,
    )

    assert len(api.calls) == 2
    for call in api.calls:
        jsonschema.validate(call.body, SCHEMA)
        assert "width" not in call.body and call.body["model"] == openai_credentials.model


def test_an_emulator_and_a_real_endpoint_never_share_an_image(
    api: GptImageEmulator,
    second_api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
) -> None:
    """Two endpoints serving the same model, sharing one PREFECT_HOME: the second stands
    in for production, and is paid for its own image."""
    second_api.models[openai_credentials.model] = None
    production = openai_credentials.model_copy(update={"base_url": second_api.openai_base_url})
    generate_images(["a shared shrike"], bucket=bucket, credentials=openai_credentials)

    report = generate_images(["a shared shrike"], bucket=bucket, credentials=production)

    assert (report.generated, report.from_cache) == (1, 0)
    assert second_api.billed == 1
    assert report.images[0].sha256 in second_api.served

    # The RapidAPI route's URL is part of its key too.
    elsewhere = credentials.model_copy(update={"base_url": second_api.base_url})
    generate_images(["a shared shrike"], bucket=bucket, credentials=credentials)
    generate_images(["a shared shrike"], bucket=bucket, credentials=elsewhere)
    assert second_api.billed == 2


def test_an_unknown_model_says_how_to_describe_it(
    api: GptImageEmulator, openai_credentials: OpenAICredentials, bucket: S3Bucket
) -> None:
    model = f"gpt-image-9-{uuid.uuid4().hex[:6]}"
    unknown = openai_credentials.model_copy(update={"model": model, "models": {}})
    with pytest.raises(ConfigurationError, match=f"Unknown model '{model}'.*models"):
        generate_images(["a novel nuthatch"], bucket=bucket, credentials=unknown)
    assert api.calls == []

    # Describing it is a block edit.
    api.models[model] = ["1024x1024"]
    described = unknown.model_copy(
        update={"models": {model: ModelSpec(sizes=["1024x1024"], flat_price_usd=0.02)}}
    )
    report = generate_images(["a novel nuthatch"], bucket=bucket, credentials=described)
    assert report.cost_usd == pytest.approx(0.02)


def test_azure_openai_sends_the_key_in_the_api_key_header(
    api: GptImageEmulator, openai_credentials: OpenAICredentials
) -> None:
    azure = openai_credentials.model_copy(
        update={"base_url": api.base_url + "/openai/v1", "auth_header": "api-key"}
    )

    @flow
    def one() -> Any:
        return fast_generate("an azure kingfisher", azure)

    image = one()

    (call,) = api.calls
    assert call.status == 200 and call.path == "/openai/v1/images/generations"
    assert call.headers.get("api-key") == "<redacted>" and "authorization" not in call.headers
    assert image.sha256 in api.served


def test_a_model_not_found_is_typed_for_one_route(
    api: GptImageEmulator, retired: OpenAICredentials
) -> None:
    @flow
    def one() -> Any:
        state = fast_generate("a vanished vireo", retired, return_state=True)
        return state.result(raise_on_failure=False)

    error = one()
    assert isinstance(error, ModelNotFoundError) and not isinstance(error, NoRouteLeftError)
    assert "gpt-image-1.5" in str(error) and "successor" in str(error)
    assert len(api.calls) == 1


def test_rate_limits_on_the_openai_route_are_retried(
    api: GptImageEmulator, openai_credentials: OpenAICredentials
) -> None:
    api.add_fault(Fault.rate_limited(retry_after=None, reset=0.2))

    @flow
    def one() -> Any:
        return fast_generate("a rate-limited robin", openai_credentials)

    image = one()

    assert [c.status for c in api.calls] == [429, 200]
    assert image.sha256 in api.served


def test_the_upload_task_stores_every_image_of_a_call(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    @flow
    def mine() -> Any:
        image = fast_generate(ImageRequest(prompt="twin terns", n=2), openai_credentials)
        return upload_image(image, bucket, prefix="mine")

    stored = mine()

    (other,) = stored.more_images
    assert {stored.sha256, other.sha256} == set(api.served)
    assert sorted(objects_in(s3_server, bucket).values()) == sorted(api.served.values())
    assert stored.cost_usd + other.cost_usd == pytest.approx(
        usage_cost(api.calls[0].usage or {}, "gpt-image-2"), abs=1e-5
    )
