"""Gateways in front of the API: LiteLLM (and proxies like it) and Azure OpenAI word errors
their own way, and name models their own way.

The emulator answers in their measured shapes (`gateway="litellm"` or `"azure"`), proven
here against the official `openai` package; a real LiteLLM proxy or Azure resource cannot
be reached from tests. What a user relies on: a spent quota or a model the gateway does not
host drops the route after one answer and the next route serves the prompts, a refusal is
a refusal on either path, and a gateway's name for a model in the table is priced and
checked as that model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from prefect_aws import S3Bucket
from pydantic import ValidationError

from prefect_gpt_image import OpenAICredentials, generate_images
from prefect_gpt_image.errors import ConfigurationError, InvalidRequestError, RunFailedError
from prefect_gpt_image.model_table import MODELS
from prefect_gpt_image.testing import Fault, GptImageEmulator


@pytest.fixture
def gateway(api_key: str) -> Iterator[GptImageEmulator]:
    """A LiteLLM-shaped gateway on a port of its own, in front of a second upstream."""
    with GptImageEmulator(api_key=api_key, gateway="litellm") as server:
        yield server


def behind(gateway: GptImageEmulator, route: OpenAICredentials) -> OpenAICredentials:
    """`route`'s model, reached through `gateway`."""
    return route.model_copy(update={"base_url": gateway.openai_base_url})


# --- The emulator speaks their shapes, as the official package reads them ----------------


_LITELLM, _AZURE = "litellm", "azure"
_THROTTLED, _AUTH = "throttling_error", "auth_error"


@pytest.mark.parametrize(
    ("shape", "fault", "error_type", "code", "kind", "said"),
    [
        (_LITELLM, Fault.insufficient_quota(), openai.RateLimitError, "429", _THROTTLED, "quota"),
        (_LITELLM, Fault.rate_limited(0.1), openai.RateLimitError, "429", _THROTTLED, "Rate"),
        (_LITELLM, Fault.moderation_blocked(), openai.BadRequestError, "400", "None", "safety"),
        (_LITELLM, Fault.model_not_found(), openai.BadRequestError, "400", "None", "model name"),
        (_LITELLM, Fault.unauthorized(), openai.AuthenticationError, "401", _AUTH, "API key"),
        (
            _AZURE,
            Fault.moderation_blocked(),
            openai.BadRequestError,
            "contentFilter",
            None,
            "safety",
        ),
        (
            _AZURE,
            Fault.model_not_found(),
            openai.NotFoundError,
            "DeploymentNotFound",
            None,
            "deploy",
        ),
        (_AZURE, Fault.unauthorized(), openai.AuthenticationError, "401", None, "subscription"),
        (_AZURE, Fault.rate_limited(0.1), openai.RateLimitError, "429", None, "retry after"),
    ],
    ids=lambda value: value.kind if isinstance(value, Fault) else None,
)
def test_the_emulator_answers_in_the_gateways_shape(
    api: GptImageEmulator,
    api_key: str,
    shape: str,
    fault: Fault,
    error_type: type[openai.APIStatusError],
    code: str,
    kind: str | None,
    said: str,
) -> None:
    """LiteLLM keeps the upstream's message and sends the status as `code` and a `type` of
    its own; Azure OpenAI has codes of its own. The official package reads both."""
    api.gateway = shape
    api.add_fault(fault)
    with (
        openai.OpenAI(base_url=api.openai_base_url, api_key=api_key, max_retries=0) as client,
        pytest.raises(error_type) as raised,
    ):
        client.images.generate(model="gpt-image-2", prompt="a gated gannet")
    assert (raised.value.code, raised.value.type) == (code, kind)
    assert said in raised.value.message
    assert api.billed == 0


# --- Fallback across routes, counted at each endpoint -------------------------------------


def test_a_spent_quota_behind_a_gateway_drops_the_route_after_one_answer(
    api: GptImageEmulator,
    gateway: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    """LiteLLM passes OpenAI's "You exceeded your current quota" on as code "429": it is a
    spent quota all the same, not a rate limit to retry."""
    gateway.models[openai_credentials.model] = None
    gateway.add_fault(Fault.insufficient_quota(), times=100)
    spent = behind(gateway, openai_credentials)

    report = generate_images(
        ["a thrifty thrush", "a thrifty tern"],
        bucket=bucket,
        credentials=[spent, openai_credentials],
        limits={"max_concurrency": 1},
    )

    assert [call.status for call in gateway.calls] == [429]
    assert api.billed == 2 and len(report.images) == 2
    assert {image.route for image in report.images} == {openai_credentials.route_name}


def test_a_model_the_gateway_does_not_host_drops_the_route(
    api: GptImageEmulator,
    gateway: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    """LiteLLM answers 400 "Invalid model name passed in model=...": the route cannot serve
    the model, whatever the status says."""
    unhosted = behind(gateway, openai_credentials)  # the gateway does not list the model

    report = generate_images(
        ["a homeless heron", "a homeless hoopoe"],
        bucket=bucket,
        credentials=[unhosted, openai_credentials],
        limits={"max_concurrency": 1},
    )

    assert [call.status for call in gateway.calls] == [400]
    assert api.billed == 2 and len(report.images) == 2


@pytest.mark.parametrize("shape", ["litellm", "azure"])
def test_a_refusal_through_a_gateway_is_a_refusal_and_is_not_sent_on(
    shape: str,
    api: GptImageEmulator,
    second_upstream: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    api.gateway = shape
    second_upstream.models[openai_credentials.model] = None
    fallback = behind(second_upstream, openai_credentials)

    with pytest.raises(RunFailedError) as raised:
        generate_images(
            ["[reject] a refused rook"],
            bucket=bucket,
            credentials=[openai_credentials, fallback],
        )

    (failure,) = raised.value.report.failures
    assert failure.error_type == "PromptRejectedError"
    assert "(400, 400)" not in failure.error and "refused the prompt (400" in failure.error
    assert len(api.calls) == 1 and second_upstream.calls == []


@pytest.fixture
def second_upstream(api_key: str) -> Iterator[GptImageEmulator]:
    with GptImageEmulator(api_key=api_key) as server:
        yield server


# --- The Batch API path reads the same shapes ---------------------------------------------


@pytest.mark.parametrize("shape", ["litellm", "azure"])
def test_a_refused_line_in_a_gateways_shape_is_a_refusal_in_batch_mode(
    shape: str, api: GptImageEmulator, openai_credentials: OpenAICredentials, bucket: S3Bucket
) -> None:
    """A batch's error file holds answers too: read by the synchronous path's reader."""
    api.gateway, api.batch_processing_seconds = shape, 0.5
    texts = ["a batched bittern", "[reject] a batched refused raven"]

    report = generate_images(
        texts,
        bucket=bucket,
        credentials=openai_credentials,
        batch={"wait_minutes": 1},
        allow_failures=1,
    )

    assert len(report.images) == 1
    (failure,) = report.failures
    assert failure.error_type == "PromptRejectedError", failure.error
    assert api.calls == [] and len(api.batch_calls) == 2


# --- A gateway's own name for a model in the table ----------------------------------------


@pytest.mark.parametrize("name", ["openai/gpt-image-2", "image-gen"])
def test_a_gateways_model_name_is_an_alias_of_a_table_entry(
    name: str, api: GptImageEmulator, api_key: str, bucket: S3Bucket
) -> None:
    api.models[name] = None
    route = OpenAICredentials(api_key=api_key, base_url=api.openai_base_url, model=name)
    with pytest.raises(ConfigurationError, match="model_aliases"):
        generate_images(["an unnamed nightjar"], bucket=bucket, credentials=route)
    assert api.calls == []

    aliased = route.model_copy(update={"model_aliases": {name: "gpt-image-2"}})
    report = generate_images(
        ["an aliased avocet"], bucket=bucket, credentials=aliased, image={"size": "1536x864"}
    )

    (call,) = api.calls
    assert call.model == name and (call.width, call.height) == (1536, 864)  # gpt-image-2's rule
    (image,) = report.images
    assert image.model == name
    assert image.cost_usd == pytest.approx(_cost(call.usage, "gpt-image-2"))


@pytest.mark.parametrize(("entry", "sent"), [("gpt-image-2", True), ("gpt-image-2.5-flare", False)])
def test_a_batch_run_through_an_alias_is_judged_by_the_entry_it_names(
    entry: str, sent: bool, api: GptImageEmulator, api_key: str, bucket: S3Bucket
) -> None:
    """The Batch API's table entry, not the gateway's name, says whether a batch may go."""
    api.models["image-gen"] = None
    route = OpenAICredentials(
        api_key=api_key,
        base_url=api.openai_base_url,
        model="image-gen",
        model_aliases={"image-gen": entry},
    )

    if sent:
        report = generate_images(["a batched bittern"], bucket=bucket, credentials=route, batch={})
        assert len(report.images) == 1 and len(api.batches) == 1
    else:
        with pytest.raises(InvalidRequestError, match="cannot send image-gen"):
            generate_images(["a batched bittern"], bucket=bucket, credentials=route, batch={})
        assert api.batches == [] and api.calls == []


def test_an_alias_must_name_a_table_entry(api_key: str) -> None:
    with pytest.raises(ValidationError, match="gpt-image-22"):
        OpenAICredentials(
            api_key=api_key, model="image-gen", model_aliases={"image-gen": "gpt-image-22"}
        )


def _cost(usage: dict[str, Any] | None, model: str) -> float:
    assert usage is not None
    prices = MODELS[model].token_prices
    assert prices is not None
    text = usage["input_tokens_details"]["text_tokens"]
    return (text * prices.text_input + usage["output_tokens"] * prices.image_output) / 1e6
