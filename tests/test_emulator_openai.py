"""The emulator's OpenAI Images route, driven by the official `openai` package over real HTTP.

The requests the package sends are also checked against OpenAI's published schema, so the
emulator cannot drift into accepting bodies the real API would refuse.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from PIL import Image

from prefect_gpt_image.testing import Fault, GptImageEmulator
from prefect_gpt_image.testing.emulator import FLEXIBLE_MIN_PIXELS

SCHEMA_PATH = Path(__file__).parent / "data" / "openai-images-schema.json"
PATH = "/v1/images/generations"


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def validate_generation_request(body: dict[str, Any]) -> None:
    """Check `body` against OpenAI's CreateImageRequest; raises jsonschema.ValidationError."""
    _validator().validate(body)


@pytest.fixture
def client(api: GptImageEmulator, api_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=api.base_url + "/v1", api_key=api_key, max_retries=0) as sdk:
        yield sdk


def post(
    api: GptImageEmulator, body: dict[str, Any], headers: dict[str, str], path: str = PATH
) -> httpx.Response:
    return httpx.post(api.base_url + path, json=body, headers=headers, timeout=10)


def decode(b64: str | None) -> Image.Image:
    assert b64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


# -- generation ---------------------------------------------------------------------------------


def test_generates_n_distinct_images_in_the_asked_format_and_reports_usage(
    client: openai.OpenAI, api: GptImageEmulator
) -> None:
    prompt = "a lighthouse on a stormy coast"
    result = client.images.generate(
        model="gpt-image-1.5",
        prompt=prompt,
        size="1536x1024",
        quality="high",
        n=2,
        output_format="webp",
    )
    assert result.data is not None and len(result.data) == 2
    images = [decode(item.b64_json) for item in result.data]
    assert [(image.format, image.size) for image in images] == [("WEBP", (1536, 1024))] * 2
    assert result.data[0].b64_json != result.data[1].b64_json
    assert (result.size, result.quality, result.output_format) == ("1536x1024", "high", "webp")
    assert result.usage is not None
    assert result.usage.output_tokens == 2 * 6240
    assert result.usage.input_tokens == 8  # ceil(30 characters / 4)
    assert result.usage.total_tokens == 2 * 6240 + 8

    (call,) = api.calls_for(prompt)
    assert (call.path, call.model, call.n, call.status) == (PATH, "gpt-image-1.5", 2, 200)
    assert (call.width, call.height) == (1536, 1024)
    assert call.usage == result.usage.model_dump(exclude_none=True)
    assert call.headers["authorization"] == "<redacted>"
    assert (api.billed, api.billed_images) == (1, 2)
    assert len(api.served) == 2


def test_defaults_are_one_medium_square_png(client: openai.OpenAI) -> None:
    result = client.images.generate(model="gpt-image-2", prompt="a fox", size="auto")
    assert result.data is not None
    assert [decode(item.b64_json).format for item in result.data] == ["PNG"]
    assert (result.size, result.quality, result.background) == ("1024x1024", "medium", "opaque")
    assert result.usage is not None and result.usage.output_tokens == 1056  # $0.034 at $32/M


def test_flexible_sizes_follow_the_models_rules(client: openai.OpenAI) -> None:
    result = client.images.generate(model="gpt-image-2", prompt="wide", size="1536x864")
    assert result.data is not None and decode(result.data[0].b64_json).size == (1536, 864)
    for model, size in [
        ("gpt-image-2", "1000x1000"),  # not multiples of 16
        ("gpt-image-2", "3840x1200"),  # wider than 3:1
        ("gpt-image-2", "3840x2880"),  # more pixels than 3840x2160
        ("gpt-image-1.5", "1536x864"),  # not in its fixed list
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.generate(model=model, prompt="p", size=size)
        assert (refused.value.code, refused.value.param) == ("invalid_value", "size"), size
        assert size in refused.value.message


def test_flexible_sizes_need_the_apis_least_area(
    client: openai.OpenAI, api: GptImageEmulator
) -> None:
    api.min_pixels = FLEXIBLE_MIN_PIXELS  # the suite lowers it to draw small images fast
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model="gpt-image-2", prompt="p", size="512x512")
    assert (refused.value.code, refused.value.param) == ("invalid_value", "size")
    assert "at least 655,360 pixels" in refused.value.message
    result = client.images.generate(model="gpt-image-2.6-flare", prompt="p", size="1024x640")
    assert result.data is not None and decode(result.data[0].b64_json).size == (1024, 640)


def test_xhigh_max_and_complexity_are_taken_by_the_models_that_have_them(
    client: openai.OpenAI, api: GptImageEmulator
) -> None:
    for model in ("gpt-image-2.5-sunburst", "gpt-image-2.6-flare"):
        for quality in ("xhigh", "max"):
            result = client.images.generate(model=model, prompt="p", quality=quality)
            assert result.quality == quality and result.usage is not None
    high = client.images.generate(model="gpt-image-2.5-flare", prompt="p", quality="high")
    assert high.usage is not None and result.usage is not None
    assert result.usage.output_tokens > high.usage.output_tokens  # max takes more than high
    client.images.generate(model="gpt-image-2.6-sunburst", prompt="p", complexity="low")

    for model, extra, param in [
        ("gpt-image-2", {"quality": "xhigh"}, "quality"),
        ("gpt-image-1.5", {"quality": "max"}, "quality"),
        ("gpt-image-2.5-flare", {"complexity": "low"}, "complexity"),
        ("gpt-image-2.6-flare", {"complexity": "extreme"}, "complexity"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.generate(model=model, prompt="p", extra_body=extra)
        assert refused.value.param == param, (model, extra)
    for call in api.calls:
        if call.status == 200:
            validate_generation_request(call.body)


def test_transparent_background_needs_a_format_with_alpha(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="gpt-image-1", prompt="a sticker", background="transparent", output_format="png"
    )
    assert result.data is not None and decode(result.data[0].b64_json).mode == "RGBA"
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(
            model="gpt-image-1", prompt="a sticker", background="transparent", output_format="jpeg"
        )
    assert (refused.value.code, refused.value.param) == ("invalid_value", "background")


def test_images_carry_the_prompts_first_words(client: openai.OpenAI) -> None:
    result = client.images.generate(model="gpt-image-2", prompt="Caption test", size="512x512")
    assert result.data is not None
    image = decode(result.data[0].b64_json).convert("L")
    # The caption sits between the serial's bar code (top eighth) and the first band.
    caption = image.crop((0, 512 // 8, 512, 512 * 3 // 10))
    shades = {shade for shade, count in enumerate(caption.histogram()) if count}
    assert 255 in shades and min(shades) < 64  # black text on a white box
    assert len(shades) > 8  # anti-aliased glyph edges, not two flat rectangles


# -- requests the real API refuses --------------------------------------------------------------


def test_unknown_parameters_are_refused(client: openai.OpenAI) -> None:
    for extra in ({"width": 1024}, {"response_format": "b64_json"}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.generate(model="gpt-image-1.5", prompt="p", extra_body=extra)
        (name,) = extra
        assert refused.value.body == {
            "message": f"Unknown parameter: '{name}'.",
            "type": "invalid_request_error",
            "param": name,
            "code": "unknown_parameter",
        }


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"quality": "ultra"}, "quality", "invalid_value"),
        ({"output_format": "gif"}, "output_format", "invalid_value"),
        ({"n": 11}, "n", "integer_above_max_value"),
        ({"n": "2"}, "n", "invalid_type"),
        ({"output_compression": -1}, "output_compression", "integer_below_min_value"),
        ({"prompt": ""}, "prompt", "empty_string"),
        ({"prompt": None}, "prompt", "missing_required_parameter"),
        ({"model": None}, "model", "missing_required_parameter"),
    ],
)
def test_invalid_values_name_the_parameter(
    api: GptImageEmulator, api_key: str, change: dict[str, Any], param: str, code: str
) -> None:
    body = {"model": "gpt-image-1.5", "prompt": "p", **change}
    response = post(api, {k: v for k, v in body.items() if v is not None}, _bearer(api_key))
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert api.billed == 0


def test_unknown_and_retired_models_are_not_found(
    client: openai.OpenAI, api: GptImageEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.images.generate(model="gpt-image-9", prompt="p")
    assert unknown.value.code == "model_not_found"
    assert "`gpt-image-9` does not exist" in unknown.value.message

    client.images.generate(model="gpt-image-1.5", prompt="p")
    monkeypatch.delitem(api.models, "gpt-image-1.5")  # retired mid-run; restored after the test
    api.reset()  # a reset does not bring it back
    with pytest.raises(openai.NotFoundError) as retired:
        client.images.generate(model="gpt-image-1.5", prompt="p")
    assert retired.value.code == "model_not_found"


# -- keys ---------------------------------------------------------------------------------------


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_wrong_key_is_refused_and_no_key_is_recorded(api: GptImageEmulator, api_key: str) -> None:
    body = {"model": "gpt-image-1.5", "prompt": "p"}
    with (
        openai.OpenAI(
            base_url=api.base_url + "/v1", api_key="sk-wrong-0123456789", max_retries=0
        ) as wrong,
        pytest.raises(openai.AuthenticationError) as refused,
    ):
        wrong.images.generate(model="gpt-image-1.5", prompt="p")
    assert refused.value.code == "invalid_api_key"
    assert "sk-wrong-0123456789" not in refused.value.message  # only the key's ends are shown
    assert post(api, body, {}).json()["error"]["code"] == "invalid_api_key"
    assert api.billed == 0
    assert all(api_key not in json.dumps(call.headers) for call in api.calls)


def test_azure_api_key_header_on_the_v1_path(api: GptImageEmulator, api_key: str) -> None:
    body = {"model": "gpt-image-1", "prompt": "azure", "size": "1024x1536"}
    answered = post(api, body, {"api-key": api_key}, path="/openai/v1/images/generations")
    assert answered.status_code == 200
    assert decode(answered.json()["data"][0]["b64_json"]).size == (1024, 1536)
    wrong = post(api, body, {"api-key": "not-the-key"}, path="/openai/v1/images/generations")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (401, "invalid_api_key")
    # Every key presented must be right: a wrong Bearer next to a right api-key is refused.
    mixed = post(api, body, {"api-key": api_key, **_bearer("unused")})
    assert mixed.status_code == 401
    (call, _, _) = api.calls
    assert (call.path, call.headers["api-key"]) == ("/openai/v1/images/generations", "<redacted>")


# -- faults and rate limits ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error_type", "code"),
    [
        (Fault.insufficient_quota(), openai.RateLimitError, "insufficient_quota"),
        (Fault.quota_exceeded(), openai.RateLimitError, "insufficient_quota"),
        (Fault.moderation_blocked(), openai.BadRequestError, "moderation_blocked"),
        (Fault.model_not_found(), openai.NotFoundError, "model_not_found"),
        (Fault.unauthorized(), openai.AuthenticationError, "invalid_api_key"),
        (Fault.not_subscribed(), openai.PermissionDeniedError, None),
        (Fault.server_error(500), openai.InternalServerError, "server_error"),
        (Fault.server_error(503), openai.InternalServerError, None),
        (Fault.bad_request("Invalid size."), openai.BadRequestError, None),
    ],
    ids=lambda value: value.kind if isinstance(value, Fault) else None,
)
def test_faults_raise_the_packages_typed_errors(
    client: openai.OpenAI,
    api: GptImageEmulator,
    fault: Fault,
    error_type: type[openai.APIStatusError],
    code: str | None,
) -> None:
    api.add_fault(fault)
    with pytest.raises(error_type) as raised:
        client.images.generate(model="gpt-image-1.5", prompt="p")
    assert raised.value.code == code
    assert api.calls[0].fault == fault.kind
    assert api.billed == 0


def test_a_rejected_prompt_is_moderation_blocked(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model="gpt-image-1.5", prompt="a [reject] prompt")
    assert (refused.value.code, refused.value.type) == (
        "moderation_blocked",
        "image_generation_user_error",
    )


@pytest.mark.parametrize(
    ("retry_after", "reset", "duration"),
    [(1.0, None, "1s"), (None, 0.12, "120ms"), (2.0, 360.0, "6m0s"), (2.5, None, "2.5s")],
)
def test_an_injected_rate_limit_carries_openais_headers(
    client: openai.OpenAI,
    api: GptImageEmulator,
    retry_after: float | None,
    reset: float | None,
    duration: str,
) -> None:
    api.add_fault(Fault.rate_limited(retry_after=retry_after, reset=reset))
    with pytest.raises(openai.RateLimitError) as refused:
        client.images.generate(model="gpt-image-1.5", prompt="p")
    assert refused.value.code == "rate_limit_exceeded"
    headers = refused.value.response.headers
    assert headers["x-ratelimit-reset-requests"] == duration
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-requests" in headers
    if retry_after is None:
        assert "retry-after" not in headers
    else:
        assert headers["retry-after"] == str(math.ceil(retry_after))
    assert api.rate_limited == 0  # injected, not the emulator's own limit


def test_the_rate_limit_reports_openais_headers_and_refuses_past_the_burst(
    client: openai.OpenAI, api: GptImageEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "rate_limit", 2)
    first = client.images.with_raw_response.generate(model="gpt-image-2", prompt="p", size="64x64")
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].endswith("ms")  # one token in 0.5 s
    assert first.parse().data is not None
    client.images.generate(model="gpt-image-2", prompt="p", size="64x64")
    with pytest.raises(openai.RateLimitError) as refused:
        client.images.generate(model="gpt-image-2", prompt="p", size="64x64")
    assert refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-remaining" not in refused.value.response.headers  # RapidAPI's names
    assert (api.rate_limited, api.billed) == (1, 2)


def test_billed_answers_without_a_usable_image(
    client: openai.OpenAI, api: GptImageEmulator, api_key: str
) -> None:
    api.add_fault(Fault.no_image())
    empty = client.images.generate(model="gpt-image-1.5", prompt="p", n=3)
    assert empty.data == []
    api.add_fault(Fault.malformed_body())
    cut = post(api, {"model": "gpt-image-1.5", "prompt": "p"}, _bearer(api_key))
    assert cut.status_code == 200
    with pytest.raises(ValueError):
        cut.json()
    api.add_fault(Fault.truncated_image())
    half = client.images.generate(model="gpt-image-1.5", prompt="p")
    assert half.data is not None
    with pytest.raises(OSError):
        decode(half.data[0].b64_json)
    assert [call.fault for call in api.calls] == ["no_image", "malformed_body", "truncated_image"]
    assert (api.billed, api.billed_images) == (3, 2)


# -- OpenAI's published schema ------------------------------------------------------------------


def test_the_schema_refuses_what_the_api_refuses() -> None:
    validate_generation_request({"prompt": "p", "model": "gpt-image-2", "size": "1536x864"})
    for body in (
        {"prompt": "p", "width": 1024},
        {"model": "gpt-image-1.5"},
        {"prompt": "p", "quality": "ultra"},
        {"prompt": "p", "n": 11},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate_generation_request(body)


def test_bodies_the_openai_package_sends_match_the_published_schema(
    client: openai.OpenAI, api: GptImageEmulator
) -> None:
    client.images.generate(model="gpt-image-1.5", prompt="minimal")
    client.images.generate(
        model="gpt-image-2",
        prompt="every option",
        size="1024x576",
        quality="low",
        n=2,
        output_format="jpeg",
        output_compression=80,
        background="opaque",
        moderation="low",
        user="user-1234",
    )
    bodies = [call.body for call in api.calls]
    assert [call.status for call in api.calls] == [200, 200]
    assert len(bodies) == 2 and "output_compression" in bodies[1]
    for body in bodies:
        validate_generation_request(body)
