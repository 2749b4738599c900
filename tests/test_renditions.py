"""Drawing a rendition: the cut, the exact pixels, the format, and the byte limit."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from prefect_gpt_image import Placement
from prefect_gpt_image._renditions import (
    MIN_QUALITY,
    RenditionError,
    check_fits,
    crop_box,
    decoded,
    extension_canvas,
    render,
    same_aspect,
    smallest_bytes,
)
from prefect_gpt_image.errors import InvalidRequestError
from prefect_gpt_image.placement_table import PRESETS, resolve_placements


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def quadrants(width: int = 1536, height: int = 1024) -> Image.Image:
    """Red, green, blue and white quarters: where a cut was taken from shows in its corners."""
    image = Image.new("RGB", (width, height))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    for n, colour in enumerate(colours):
        left, top = (n % 2) * width // 2, (n // 2) * height // 2
        image.paste(colour, (left, top, left + width // 2, top + height // 2))
    return image


def noise(width: int, height: int, seed: int = 7) -> Image.Image:
    """Pixels no encoder can squeeze much: a photo's worst case."""
    rng = random.Random(seed)
    return Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_comes_out_at_exactly_its_pixels_and_under_its_limit(name: str) -> None:
    placement = PRESETS[name]

    rendition = render(quadrants(), placement)

    image = opened(rendition.data)
    assert image.size == (placement.width, placement.height)
    assert placement.max_bytes is None or len(rendition.data) <= placement.max_bytes
    assert Image.MIME[image.format or ""] == rendition.media_type


def test_the_cut_keeps_the_aspect_and_centres_or_follows_the_focus() -> None:
    assert crop_box((1536, 1024), 1.0) == (256, 0, 1280, 1024)
    assert crop_box((1536, 1024), 1.0, focus=(0.0, 0.5)) == (0, 0, 1024, 1024)
    assert crop_box((1536, 1024), 1.0, focus=(0.9, 0.5)) == (512, 0, 1536, 1024)  # at the edge
    assert crop_box((1024, 1024), 8.0) == (0, 448, 1024, 576)

    left = render(quadrants(), Placement(name="left", width=100, height=100), focus=(0.0, 0.0))

    corner = opened(left.data).convert("RGB")
    assert corner.getpixel((5, 5)) == (255, 0, 0)  # the red quarter, top left
    assert left.cropped == pytest.approx(1 - 1024 / 1536)


def test_a_byte_limit_takes_the_best_quality_that_fits() -> None:
    picture = noise(600, 500)
    resized = picture.resize((300, 250), Image.Resampling.LANCZOS, reducing_gap=3.0)
    limit = _jpeg_size(resized, 90) // 3
    tight = Placement(name="tight", width=300, height=250, output_format="jpeg", max_bytes=limit)

    rendition = render(picture, tight)

    assert rendition.media_type == "image/jpeg" and len(rendition.data) <= limit
    [quality] = [q for q in range(MIN_QUALITY, 91) if _jpeg(resized, q) == rendition.data]
    assert _jpeg_size(resized, quality + 1) > limit  # the next quality up would not fit


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _jpeg_size(image: Image.Image, quality: int) -> int:
    return len(_jpeg(image, quality))


def test_png_where_it_fits_else_jpeg() -> None:
    flat = render(quadrants(), Placement(name="flat", width=300, height=250, max_bytes=150_000))
    busy = render(noise(600, 500), Placement(name="busy", width=300, height=250, max_bytes=150_000))

    assert flat.media_type == "image/png"
    assert busy.media_type == "image/jpeg" and len(busy.data) <= 150_000


def test_a_limit_no_quality_meets_fails_with_its_reason() -> None:
    floor = smallest_bytes(300, 250, "jpeg")
    placement = Placement(
        name="tiny", width=300, height=250, output_format="jpeg", max_bytes=floor + 10
    )

    check_fits(placement)  # a blank image would fit: not refused before paying
    with pytest.raises(
        RenditionError, match=rf"'tiny' \(300x250\) must fit in {floor + 10:,} bytes"
    ):
        render(noise(600, 500), placement)


def test_a_limit_no_image_could_meet_is_refused_before_paying() -> None:
    with pytest.raises(
        InvalidRequestError, match=r"'one-kb' \(1200x628\) asks for at most 1,000 bytes"
    ):
        check_fits(Placement(name="one-kb", width=1200, height=628, max_bytes=1000))
    check_fits(PRESETS["display-leaderboard"])


def test_an_extension_canvas_holds_the_whole_image_and_masks_the_new_area() -> None:
    canvas_bytes, mask_bytes = extension_canvas(png(quadrants(1024, 1024)), 1536, 1024)

    canvas, mask = opened(canvas_bytes), opened(mask_bytes)
    assert canvas.size == mask.size == (1536, 1024)
    alpha = mask.getchannel("A")
    assert alpha.getpixel((100, 500)) == 0 and alpha.getpixel((1400, 500)) == 0  # new: drawn
    assert alpha.getpixel((256, 0)) == 255 and alpha.getpixel((1279, 1023)) == 255  # kept
    assert canvas.convert("RGBA").getpixel((300, 10)) == (255, 0, 0, 255)
    assert canvas.getchannel("A").getpixel((10, 10)) == 0


def test_aspects_within_the_tolerance_are_one_shape() -> None:
    assert same_aspect(1200, 628, 1200, 627) and same_aspect(1080, 1080, 1024, 1024)
    assert not same_aspect(1080, 1350, 1024, 1024)


def test_decoded_turns_palette_images_into_rgba() -> None:
    assert decoded(png(quadrants(64, 64).convert("P"))).mode == "RGBA"


def test_placements_resolve_from_presets_sizes_and_objects() -> None:
    custom = Placement(name="shop-tile", width=400, height=300)

    resolved = resolve_placements(["meta-reels", "300x250", custom, "META-REELS"])

    assert [p.name for p in resolved] == ["meta-reels", "300x250", "shop-tile"]
    assert resolved[0].safe_zone is not None
    assert resolved[0].safe_zone.describe() == "top 14% and bottom 35%"
    with pytest.raises(InvalidRequestError, match="meta-feed-square") as caught:
        resolve_placements(["meta-feed-sqaure"])
    assert "'meta-feed-sqaure'" in str(caught.value)
    with pytest.raises(InvalidRequestError, match="Two placements are named 'shop-tile'"):
        resolve_placements([custom, Placement(name="shop-tile", width=300, height=300)])


def test_a_team_adds_presets_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT_IMAGE_PLACEMENTS", '{"shop-tile": {"width": 400, "height": 300}}')

    [tile] = resolve_placements(["shop-tile"])

    assert (tile.name, tile.size) == ("shop-tile", "400x300")
