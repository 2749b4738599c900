"""Object keys: readable slugs, safe prefixes, and keys no prompt or name can escape."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from prefect_gpt_image._object_keys import image_key, manifest_key, normalize_prefix, slugify
from prefect_gpt_image.errors import InvalidRequestError
from prefect_gpt_image.models import GeneratedImage, ImageRequest

DATA = b"\x89PNG\r\n\x1a\nnot really an image"
SHA = hashlib.sha256(DATA).hexdigest()


def generated(request: ImageRequest, media_type: str = "image/png") -> GeneratedImage:
    return GeneratedImage(
        data=DATA,
        sha256=SHA,
        media_type=media_type,
        width=request.width,
        height=request.height,
        request=request,
        model="gpt-image-1",
        generated_at=datetime(2026, 3, 1, tzinfo=timezone.utc),
    )


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("A Red Fox, at Dawn!", "a-red-fox-at-dawn"),
        ("Crème brûlée à la façade", "creme-brulee-a-la-facade"),
        ("Ångström über naïve", "angstrom-uber-naive"),
        ("東京の夜景", "image"),
        ("Закат над морем", "image"),
        ("🦊🌅", "image"),
        ("", "image"),
        ("  ---  ", "image"),
        ("\ufb01ne \uff12\uff10\uff12\uff16", "fine-2026"),  # NFKD compatibility forms
    ],
)
def test_slugify(text: str, slug: str) -> None:
    assert slugify(text) == slug


def test_slugify_cuts_long_text_at_a_hyphen() -> None:
    text = "the quick brown fox jumps over the lazy dog and keeps running far away"
    assert slugify(text) == "the-quick-brown-fox-jumps-over-the-lazy-dog-and"
    assert slugify("x" * 100) == "x" * 48
    assert slugify("one two three", max_chars=9) == "one-two"


@pytest.mark.parametrize(
    ("prefix", "normalized"),
    [
        ("campaigns/2026-spring", "campaigns/2026-spring"),
        ("/campaigns/2026-spring/", "campaigns/2026-spring"),
        ("  team_a/v1.2/size=1024@x+2 ", "team_a/v1.2/size=1024@x+2"),
        ("", ""),
        ("/", ""),
    ],
)
def test_normalize_prefix_accepts_safe_folders(prefix: str, normalized: str) -> None:
    assert normalize_prefix(prefix) == normalized


@pytest.mark.parametrize(
    "prefix",
    ["..", "a/../b", "a/./b", "a//b", "a\x00b", "a\nb/c", "my folder", "a\\b", "%2e%2e", "ümlaut"],
)
def test_normalize_prefix_refuses_unsafe_folders(prefix: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        normalize_prefix(prefix)
    assert str(raised.value).startswith(f"The prefix {prefix!r} is not a safe S3 folder: ")


def test_image_key_is_readable_and_content_addressed() -> None:
    image = generated(ImageRequest(prompt="A red fox at dawn"))
    assert image_key("renders", "campaigns/2026", image) == (
        f"renders/campaigns/2026/a-red-fox-at-dawn-{SHA[:12]}.png"
    )
    named = generated(ImageRequest(prompt="A red fox", name="Hero Banner"), "image/webp")
    assert image_key("", "", named) == f"hero-banner-{SHA[:12]}.webp"
    jpeg = generated(ImageRequest(prompt="x"), "image/jpeg")
    assert image_key("/out/", "/p/", jpeg) == f"out/p/x-{SHA[:12]}.jpg"


def test_manifest_key_sits_beside_the_images() -> None:
    assert manifest_key("renders", "/campaigns/", "Run 2026-03-01 12:00") == (
        "renders/campaigns/manifest-run-2026-03-01-12-00.jsonl"
    )


NASTY = [
    "../../etc/passwd",
    "/absolute",
    "..",
    "%2e%2e%2f%2e%2e",
    "..\\..\\windows\\system32",
    "\u202eexe.gnp",
    "\u200f\u200e\u200b",
    "🦊/../🦊",
    "name\twith\ntabs",
    "s3://other-bucket/key",
    "Ωmega ../ 東京 / ~root",
    "a" * 5000 + "/../" + "b" * 5000,
]


@pytest.mark.parametrize("text", NASTY)
@pytest.mark.parametrize("as_name", [False, True])
def test_image_key_never_escapes_its_prefix(text: str, as_name: bool) -> None:
    request = ImageRequest(prompt="p", name=text[:200]) if as_name else ImageRequest(prompt=text)
    key = image_key("renders", "campaigns/2026", generated(request))
    assert key.startswith("renders/campaigns/2026/")
    filename = key.removeprefix("renders/campaigns/2026/")
    assert re.fullmatch(rf"[a-z0-9]+(-[a-z0-9]+)*-{SHA[:12]}\.png", filename), key
    assert ".." not in key.split("/")
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", key)


@pytest.mark.parametrize("text", ["a\x00b", "../\x1b[31m", "\x7f", "x\x85y"])
def test_control_characters_are_refused_before_any_key(text: str) -> None:
    with pytest.raises(ValidationError, match="the prompt holds a control character"):
        ImageRequest(prompt=text)
    with pytest.raises(ValidationError, match="the name holds a control character"):
        ImageRequest(prompt="p", name=text)
