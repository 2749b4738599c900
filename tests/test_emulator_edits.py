"""The emulator's OpenAI image edits route, driven by the official `openai` package over real
HTTP: uploads are checked as the API checks them, recorded by their SHA-256, and billed."""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from prefect_gpt_image import OpenAICredentials
from prefect_gpt_image.testing import Fault, GptImageEmulator

PATH = "/v1/images/edits"
SIDE = 64

FileTuple = tuple[str, bytes, str]


@pytest.fixture
def client(api: GptImageEmulator, api_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=api.openai_base_url, api_key=api_key, max_retries=0) as sdk:
        yield sdk


@pytest.fixture
def model(openai_credentials: OpenAICredentials) -> str:
    """A model the emulator serves with flexible sizes."""
    return openai_credentials.model


def encode(
    colour: tuple[int, ...],
    size: tuple[int, int] = (SIDE, SIDE),
    mode: str = "RGB",
    image_format: str = "PNG",
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, image_format)
    return buffer.getvalue()


def png(name: str, colour: tuple[int, ...], size: tuple[int, int] = (SIDE, SIDE)) -> FileTuple:
    return name, encode(colour, size), "image/png"


def mask(size: tuple[int, int] = (SIDE, SIDE), mode: str = "RGBA") -> FileTuple:
    """Fully transparent where the edit may paint (here: everywhere)."""
    return "mask.png", encode((0,) * len(mode), size, mode), "image/png"


def sha256(file: FileTuple) -> str:
    return hashlib.sha256(file[1]).hexdigest()


def decode(b64: str | None) -> Image.Image:
    assert b64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_edits_photos_with_a_mask_and_records_their_bytes(
    client: openai.OpenAI, api: GptImageEmulator, model: str
) -> None:
    photos = [png("first.png", (200, 30, 30)), png("second.png", (30, 200, 30))]
    the_mask = mask()
    result = client.images.edit(
        model=model,
        image=photos,
        mask=the_mask,
        prompt="put a hat on the cat",
        input_fidelity="high",
        n=2,
    )
    assert result.data is not None and len(result.data) == 2
    images = [decode(item.b64_json) for item in result.data]
    # "auto" is the first photo's size, already a multiple of 16.
    assert [(image.format, image.size) for image in images] == [("PNG", (SIDE, SIDE))] * 2
    assert result.data[0].b64_json != result.data[1].b64_json
    assert result.usage is not None
    # Per square photo at high fidelity: 65 + 129 x 4 tiles.
    assert result.usage.input_tokens_details.image_tokens == 2 * 581
    assert result.usage.input_tokens_details.text_tokens == 5  # ceil(20 characters / 4)
    assert result.usage.input_tokens == 2 * 581 + 5

    (call,) = api.calls
    assert (call.path, call.status, call.model, call.n) == (PATH, 200, model, 2)
    assert call.inputs == [sha256(photo) for photo in photos]
    assert (call.mask, call.input_fidelity) == (sha256(the_mask), "high")
    assert (call.width, call.height) == (SIDE, SIDE)
    assert call.usage == result.usage.model_dump(exclude_none=True)
    assert call.body["prompt"] == "put a hat on the cat" and "image" not in call.body
    assert call.headers["authorization"] == "<redacted>"
    assert (api.billed, api.billed_images, len(api.served)) == (1, 2, 2)


def test_a_masked_edit_keeps_the_photo_where_the_mask_is_opaque(
    client: openai.OpenAI, model: str
) -> None:
    red = (200, 30, 30)
    half = Image.new("RGBA", (SIDE, SIDE), (0, 0, 0, 0))
    half.paste((0, 0, 0, 255), (0, 0, SIDE // 2, SIDE))  # keep the left half
    buffer = io.BytesIO()
    half.save(buffer, "PNG")

    result = client.images.edit(
        model=model,
        image=png("photo.png", red),
        mask=("mask.png", buffer.getvalue(), "image/png"),
        prompt="extend the scene to the right",
    )

    assert result.data is not None
    image = decode(result.data[0].b64_json).convert("RGB")
    kept = image.crop((0, 0, SIDE // 2, SIDE)).getcolors()
    drawn = image.crop((SIDE // 2, 0, SIDE, SIDE)).getcolors(SIDE * SIDE) or []
    assert kept == [(SIDE * SIDE // 2, red)]
    assert red not in {colour for _, colour in drawn}


def test_image_tokens_grow_with_the_photos_and_their_fidelity(
    client: openai.OpenAI, api: GptImageEmulator, model: str
) -> None:
    wide = png("wide.png", (9, 9, 9), (3 * SIDE, SIDE))
    tokens = []
    for photos, fidelity in [([wide], "low"), ([wide, wide], "low"), ([wide], "high")]:
        result = client.images.edit(
            model=model, image=photos, prompt="p", input_fidelity=fidelity, size="64x64"
        )
        assert result.usage is not None
        tokens.append(result.usage.input_tokens_details.image_tokens)
    assert tokens == [65 + 129 * 3, 2 * (65 + 129 * 3), 65 + 129 * 12]
    assert [call.input_fidelity for call in api.calls] == ["low", "low", "high"]


def test_a_single_jpeg_photo_is_edited_at_its_own_size(
    client: openai.OpenAI, api: GptImageEmulator, model: str
) -> None:
    photo = ("photo.jpg", encode((90, 60, 30), (96, 48), image_format="JPEG"), "image/jpeg")
    result = client.images.edit(model=model, image=photo, prompt="a sunset", output_format="webp")
    assert result.data is not None
    assert decode(result.data[0].b64_json).size == (96, 48)
    assert (result.size, result.output_format) == ("96x48", "webp")
    (call,) = api.calls
    assert (call.inputs, call.mask, call.input_fidelity) == ([sha256(photo)], None, "low")


def test_auto_picks_the_listed_size_nearest_the_photos_shape(client: openai.OpenAI) -> None:
    tall = png("tall.png", (1, 2, 3), (SIDE, 2 * SIDE))
    result = client.images.edit(model="gpt-image-1.5", image=tall, prompt="p", quality="low")
    assert result.size == "1024x1536"


def test_a_mask_of_another_size_is_refused_and_not_billed(
    client: openai.OpenAI, api: GptImageEmulator, model: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(
            model=model, image=[png("a.png", (1, 1, 1))], mask=mask((32, 32)), prompt="p"
        )
    assert (refused.value.param, refused.value.type) == ("mask", "invalid_request_error")
    assert "32x32" in refused.value.message and "64x64" in refused.value.message
    assert [call.status for call in api.calls] == [400]
    assert (api.billed, api.served) == (0, {})


@pytest.mark.parametrize(
    ("the_mask", "code"),
    [
        (mask(mode="RGB"), "invalid_image_format"),  # no alpha channel
        (
            ("mask.webp", encode((0, 0, 0, 0), mode="RGBA", image_format="WEBP"), "image/webp"),
            "unsupported_file_mimetype",
        ),
        (
            ("mask.png", encode((0, 0, 0, 0), mode="RGBA", image_format="WEBP"), "image/png"),
            "invalid_image_format",
        ),
    ],
    ids=["no-alpha", "webp-type", "webp-bytes"],
)
def test_a_mask_must_be_a_png_with_alpha(
    client: openai.OpenAI, api: GptImageEmulator, model: str, the_mask: FileTuple, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(model=model, image=png("a.png", (1, 1, 1)), mask=the_mask, prompt="p")
    assert (refused.value.param, refused.value.code) == ("mask", code)
    assert api.billed == 0


def test_seventeen_photos_are_refused(
    client: openai.OpenAI, api: GptImageEmulator, model: str
) -> None:
    photo = png("a.png", (5, 5, 5), (16, 16))
    client.images.edit(model=model, image=[photo] * 16, prompt="p", size="16x16")
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(model=model, image=[photo] * 17, prompt="p", size="16x16")
    assert (refused.value.param, refused.value.code) == ("image", "array_above_max_length")
    assert [len(call.inputs) for call in api.calls] == [16, 0]
    assert api.billed == 1


@pytest.mark.parametrize(
    ("photo", "code"),
    [
        (
            ("a.gif", encode((1, 2, 3), image_format="GIF"), "image/gif"),
            "unsupported_file_mimetype",
        ),
        (("a.png", b"<html>not an image</html>", "image/png"), "invalid_image_format"),
        (("a.png", encode((1, 2, 3), image_format="GIF"), "image/png"), "invalid_image_format"),
    ],
    ids=["gif-type", "html-bytes", "gif-bytes"],
)
def test_photos_must_be_png_jpeg_or_webp(
    client: openai.OpenAI, model: str, photo: FileTuple, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(model=model, image=photo, prompt="p")
    assert (refused.value.param, refused.value.code) == ("image", code)


def test_an_unknown_input_fidelity_is_refused(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(
            model=model,
            image=png("a.png", (1, 1, 1)),
            prompt="p",
            input_fidelity="medium",  # type: ignore[arg-type]
        )
    assert (refused.value.param, refused.value.code) == ("input_fidelity", "invalid_value")


def test_forms_without_a_prompt_or_a_photo_and_other_bodies_are_refused(
    api: GptImageEmulator, api_key: str, model: str
) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    url = api.openai_base_url + "/images/edits"
    photo = png("a.png", (1, 1, 1))
    for files, data, param in [
        ([("image", photo)], {"model": model}, "prompt"),
        ([("mask", mask())], {"model": model, "prompt": "p"}, "image"),
    ]:
        response = httpx.post(url, files=files, data=data, headers=headers, timeout=10)
        assert response.status_code == 400
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, "missing_required_parameter")
    as_json = httpx.post(url, json={"model": model, "prompt": "p"}, headers=headers, timeout=10)
    assert as_json.status_code == 400
    assert "multipart/form-data" in as_json.json()["error"]["message"]
    assert api.billed == 0


def test_unknown_and_faulted_models_are_not_found(
    client: openai.OpenAI, api: GptImageEmulator, model: str
) -> None:
    photo = png("a.png", (1, 1, 1))
    with pytest.raises(openai.NotFoundError) as unknown:
        client.images.edit(model="gpt-image-9", image=photo, prompt="p")
    assert unknown.value.code == "model_not_found"
    assert "`gpt-image-9` does not exist" in unknown.value.message
    api.add_fault(Fault.model_not_found())
    with pytest.raises(openai.NotFoundError) as faulted:
        client.images.edit(model=model, image=photo, prompt="p")
    assert faulted.value.code == "model_not_found"
    assert [call.fault for call in api.calls] == [None, "model_not_found"]
    assert api.billed == 0


def test_keys_faults_and_rate_limits_apply_as_to_generations(
    client: openai.OpenAI, api: GptImageEmulator, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = png("a.png", (1, 1, 1))
    with (
        openai.OpenAI(base_url=api.openai_base_url, api_key="sk-wrong-0123456789") as wrong,
        pytest.raises(openai.AuthenticationError),
    ):
        wrong.with_options(max_retries=0).images.edit(model=model, image=photo, prompt="p")
    api.add_fault(Fault.moderation_blocked())
    with pytest.raises(openai.BadRequestError) as blocked:
        client.images.edit(model=model, image=photo, prompt="p")
    assert blocked.value.code == "moderation_blocked"
    monkeypatch.setattr(api, "rate_limit", 1)
    client.images.edit(model=model, image=photo, prompt="p")
    with pytest.raises(openai.RateLimitError) as limited:
        client.images.edit(model=model, image=photo, prompt="p")
    assert limited.value.code == "rate_limit_exceeded"
    assert [call.status for call in api.calls] == [401, 400, 200, 429]
    assert (api.billed, api.rate_limited) == (1, 1)
