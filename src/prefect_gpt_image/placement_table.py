"""The placement table, in one place: the channels a campaign runs on, at their exact pixels,
formats and byte limits.

Placements are data, as models are: each figure names its source beside it, and a team adds
or overrides presets without a release, through `GPT_IMAGE_PLACEMENTS` (a JSON object of
name to placement, read by `placement_presets`) or by passing `Placement`s to a run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_gpt_image._form_schema import OptionGroup
from prefect_gpt_image.errors import ConfigurationError, InvalidRequestError
from prefect_gpt_image.model_table import OutputFormat

Adapt = Literal["crop", "extend", "generate"]
"""How a master becomes a placement of another shape: cut from it, extended from it by an
edit, or generated at the placement's own aspect."""

PLACEMENT_NAME = r"^[a-z0-9][a-z0-9-]{0,39}$"
"""A placement's name goes into its renditions' keys: lower case, digits and hyphens."""
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
MAX_SIDE = 16_384
"""No placement is wider or taller: Pillow and every ad platform stop well before it."""


class SafeZone(OptionGroup):
    """Shares of a placement's edges the platform covers with its own interface (a profile,
    captions, buttons), which should stay free of text and logos."""

    top: float = Field(default=0.0, ge=0, lt=0.5, description="Share of the height at the top.")
    bottom: float = Field(
        default=0.0, ge=0, lt=0.5, description="Share of the height at the bottom."
    )
    left: float = Field(default=0.0, ge=0, lt=0.5, description="Share of the width at the left.")
    right: float = Field(default=0.0, ge=0, lt=0.5, description="Share of the width at the right.")

    def describe(self) -> str:
        """`top 14% and bottom 35%`: the edges kept free, for a prompt or a caption."""
        edges = [
            f"{edge} {share:.0%}"
            for edge, share in (
                ("top", self.top),
                ("bottom", self.bottom),
                ("left", self.left),
                ("right", self.right),
            )
            if share
        ]
        return " and ".join(edges)


class Placement(OptionGroup):
    """Where an image runs: its exact pixels, its file format and the most bytes it may take.

    Example:
        A 1200x628 link image under 400 KB, as WebP:
        ```python
        from prefect_gpt_image import Placement

        Placement(name="newsletter-hero", width=1200, height=628, output_format="webp",
                  max_bytes=400_000)
        ```
    """

    name: str = Field(
        pattern=PLACEMENT_NAME,
        description="What it is called in keys and reports: lower case, digits and hyphens.",
    )
    width: int = Field(ge=1, le=MAX_SIDE, description="Its width in pixels.")
    height: int = Field(ge=1, le=MAX_SIDE, description="Its height in pixels.")
    output_format: OutputFormat | None = Field(
        default=None,
        description="Its file format; None for PNG where it fits the byte limit, else JPEG.",
    )
    max_bytes: int | None = Field(
        default=None, ge=1, description="The largest file it may be, in bytes; None for any."
    )
    safe_zone: SafeZone | None = Field(
        default=None, description="The edges the platform covers, to keep free of text."
    )
    source: str | None = Field(
        default=None, description="Where its figures come from, for a reader of the table."
    )

    @property
    def aspect(self) -> float:
        """Width over height."""
        return self.width / self.height

    @property
    def size(self) -> str:
        """`WIDTHxHEIGHT`."""
        return f"{self.width}x{self.height}"


_META = "Meta Ads Guide, image and video specs (facebook.com/business/ads-guide), 2026-11"
_META_STORIES = f"{_META}: leave about 14% at the top and bottom free of text and logos"
_META_REELS = f"{_META}: leave about 14% at the top and 35% at the bottom free of text and logos"
_LINKEDIN = "LinkedIn single image ads specs (business.linkedin.com/marketing-solutions), 2026-11"
_GOOGLE_RDA = "Google Ads help, responsive display ads image specs (support.google.com), 2026-11"
_GOOGLE_BANNERS = (
    "Google Ads help, uploaded image ad sizes; 150 KB a file (support.google.com), 2026-11"
)
_META_MAX_BYTES = 30 * 1024 * 1024
_LINKEDIN_MAX_BYTES = 5 * 1024 * 1024
_GOOGLE_RDA_MAX_BYTES = 5120 * 1024
_BANNER_MAX_BYTES = 150_000
"""150 KB, counted in thousands: within the limit whichever way a platform counts a KB."""


def _preset(
    name: str,
    width: int,
    height: int,
    max_bytes: int,
    source: str,
    safe_zone: SafeZone | None = None,
) -> Placement:
    return Placement(
        name=name,
        width=width,
        height=height,
        max_bytes=max_bytes,
        safe_zone=safe_zone,
        source=source,
    )


PRESETS: Mapping[str, Placement] = {
    preset.name: preset
    for preset in (
        _preset("meta-feed-square", 1080, 1080, _META_MAX_BYTES, _META),
        _preset("meta-feed-portrait", 1080, 1350, _META_MAX_BYTES, _META),
        _preset(
            "meta-stories",
            1080,
            1920,
            _META_MAX_BYTES,
            _META_STORIES,
            SafeZone(top=0.14, bottom=0.14),
        ),
        _preset(
            "meta-reels", 1080, 1920, _META_MAX_BYTES, _META_REELS, SafeZone(top=0.14, bottom=0.35)
        ),
        _preset("meta-link", 1200, 628, _META_MAX_BYTES, _META),
        _preset("linkedin-landscape", 1200, 627, _LINKEDIN_MAX_BYTES, _LINKEDIN),
        _preset("linkedin-square", 1200, 1200, _LINKEDIN_MAX_BYTES, _LINKEDIN),
        _preset("google-display-landscape", 1200, 628, _GOOGLE_RDA_MAX_BYTES, _GOOGLE_RDA),
        _preset("google-display-square", 1200, 1200, _GOOGLE_RDA_MAX_BYTES, _GOOGLE_RDA),
        _preset("display-medium-rectangle", 300, 250, _BANNER_MAX_BYTES, _GOOGLE_BANNERS),
        _preset("display-leaderboard", 728, 90, _BANNER_MAX_BYTES, _GOOGLE_BANNERS),
        _preset("display-half-page", 300, 600, _BANNER_MAX_BYTES, _GOOGLE_BANNERS),
        _preset("display-wide-skyscraper", 160, 600, _BANNER_MAX_BYTES, _GOOGLE_BANNERS),
        _preset("display-billboard", 970, 250, _BANNER_MAX_BYTES, _GOOGLE_BANNERS),
        _preset("display-mobile-banner", 320, 50, _BANNER_MAX_BYTES, _GOOGLE_BANNERS),
    )
}
"""The built-in presets, by name."""


class PlacementSettings(BaseSettings):
    """Presets a team adds or overrides for every run: `GPT_IMAGE_PLACEMENTS`, a JSON object
    of name to a placement's other fields, e.g.
    `{"newsletter-hero": {"width": 1200, "height": 628, "max_bytes": 400000}}`."""

    model_config = SettingsConfigDict(env_prefix="GPT_IMAGE_", extra="ignore")

    placements: dict[str, dict[str, Any]] = Field(default_factory=dict)


def environment_placements() -> dict[str, Placement]:
    """The presets `GPT_IMAGE_PLACEMENTS` describes, by name."""
    try:
        described = PlacementSettings().placements
        return {
            name: Placement.model_validate({**fields, "name": name})
            for name, fields in described.items()
        }
    except ValidationError as exc:
        raise ConfigurationError(
            f"GPT_IMAGE_PLACEMENTS describes an invalid placement: {exc}"
        ) from None


def placement_presets(overrides: Mapping[str, Placement] | None = None) -> dict[str, Placement]:
    """The presets a run knows: the built-in table, then the environment's
    `GPT_IMAGE_PLACEMENTS`, then `overrides`; a later entry of the same name wins."""
    return {**PRESETS, **environment_placements(), **(overrides or {})}


def resolve_placements(
    values: Sequence[str | Placement | Mapping[str, object]],
    presets: Mapping[str, Placement] | None = None,
) -> list[Placement]:
    """`values` as placements: a preset's name, `"WIDTHxHEIGHT"`, or a `Placement` (or its
    fields). An unknown name, or two placements of one name, is refused before anything is
    paid, naming the presets there are. `presets`: default `placement_presets()`."""
    table = placement_presets() if presets is None else presets
    resolved: list[Placement] = []
    for value in values:
        placement = _resolved(value, table)
        if any(known.name == placement.name for known in resolved):
            if placement in resolved:
                continue
            raise InvalidRequestError(
                f"Two placements are named {placement.name!r}: give each its own name."
            )
        resolved.append(placement)
    return resolved


def _resolved(
    value: str | Placement | Mapping[str, object], table: Mapping[str, Placement]
) -> Placement:
    if isinstance(value, Placement):
        return value
    if not isinstance(value, str):
        return Placement.model_validate(value)
    name = value.strip().lower()
    if name in table:
        return table[name]
    if match := _SIZE.match(name):
        width, height = int(match[1]), int(match[2])
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            raise InvalidRequestError(
                f"Placement {value!r}: each side is between 1 and {MAX_SIDE:,} pixels."
            )
        return Placement(name=f"{width}x{height}", width=width, height=height)
    raise InvalidRequestError(
        f"Unknown placement {value!r}: give WIDTHxHEIGHT, a Placement, or one of the presets "
        f"{', '.join(sorted(table))}."
    )
