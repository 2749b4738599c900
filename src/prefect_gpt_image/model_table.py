"""The model table, in one place: what each GPT Image model accepts, and what it charges.

Models are data, not code. A block can override an entry or add a model (its `models`
field), so a model launched tomorrow is a block edit, not a release. The figures are
OpenAI's published API reference and pricing (November 2026).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from prefect_gpt_image.errors import ConfigurationError, InvalidRequestError

if TYPE_CHECKING:
    from prefect_gpt_image.models import ImageRequest

Quality = Literal["low", "medium", "high", "auto"]
OutputFormat = Literal["png", "jpeg", "webp"]
Background = Literal["transparent", "opaque", "auto"]
Moderation = Literal["low", "auto"]

STANDARD_SIZES = ("1024x1024", "1536x1024", "1024x1536")
"""Square, landscape and portrait: the sizes every GPT Image model makes."""
REFERENCE_PIXELS = 1024 * 1024
"""Token counts in the table are for a square image; other sizes scale with their area."""


class SizeRule(BaseModel):
    """Any WIDTHxHEIGHT within these bounds, for models that take free sizes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    multiple_of: int = Field(default=16, ge=1, description="Both sides divide by this.")
    max_long_side: int = Field(default=3840, ge=1, description="The longest side allowed.")
    max_pixels: int = Field(default=3840 * 2160, ge=1, description="The largest area allowed.")
    max_aspect_ratio: float = Field(
        default=3.0, ge=1, description="Long side over short side, at most."
    )
    experimental_above_pixels: int | None = Field(
        default=2560 * 1440, description="Sizes above this area are experimental (a warning)."
    )

    def problem(self, width: int, height: int) -> str | None:
        """The rule `width`x`height` breaks, or None."""
        if width % self.multiple_of or height % self.multiple_of:
            return f"both sides must be multiples of {self.multiple_of}"
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            ratio = f"{self.max_aspect_ratio:g}"
            return f"the aspect ratio must be between 1:{ratio} and {ratio}:1"
        if max(width, height) > self.max_long_side or width * height > self.max_pixels:
            return (
                f"the size must be at most {self.max_long_side} on its long side and "
                f"{self.max_pixels:,} pixels"
            )
        return None


class ImagePrice(BaseModel):
    """USD per image of one quality."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    square: float = Field(ge=0, description="A 1024x1024 image.")
    non_square: float = Field(ge=0, description="A 1536x1024 or 1024x1536 image.")


class TokenPrices(BaseModel):
    """USD per million tokens, as the answer's `usage` reports them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_input: float = Field(ge=0, description="Per million text input tokens.")
    image_input: float = Field(ge=0, description="Per million image input tokens.")
    image_output: float = Field(ge=0, description="Per million image output tokens.")


class ModelSpec(BaseModel):
    """What one model accepts, and how it is priced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sizes: list[str] | None = Field(
        default=list(STANDARD_SIZES),
        description="The WIDTHxHEIGHT sizes it makes; None to follow `size_rule`.",
    )
    size_rule: SizeRule | None = Field(
        default=None, description="The rule free sizes follow, when `sizes` is None."
    )
    qualities: list[Quality] = Field(default=["low", "medium", "high", "auto"])
    max_n: int = Field(default=10, ge=1, description="The most images one call makes.")
    output_formats: list[OutputFormat] = Field(default=["png", "jpeg", "webp"])
    transparent_formats: list[OutputFormat] = Field(
        default=["png", "webp"], description="Formats a transparent background works with."
    )
    edits: bool = Field(default=True, description="Whether it edits images as well.")
    image_prices: dict[Quality, ImagePrice] | None = Field(
        default=None, description="USD per image by quality, where the provider lists them."
    )
    token_prices: TokenPrices | None = Field(
        default=None, description="USD per million tokens, for answers that report usage."
    )
    output_tokens: dict[Quality, int] | None = Field(
        default=None,
        description="Image output tokens of a 1024x1024 image by quality, to price sizes "
        "the per-image list does not name.",
    )
    flat_price_usd: float | None = Field(
        default=None, ge=0, description="USD per image whatever its size and quality."
    )

    def check(self, model: str, request: ImageRequest) -> None:
        """Refuse, before any paid call, a request this model cannot serve; the message
        names the rule it broke."""
        where = f"{model} (prompt {request.label!r})"
        if self.sizes is not None and request.size not in self.sizes:
            raise InvalidRequestError(
                f"{where} cannot make {request.size} images: its sizes are {', '.join(self.sizes)}."
            )
        rule = self.size_rule if self.sizes is None else None
        if rule is not None and (problem := rule.problem(request.width, request.height)):
            raise InvalidRequestError(f"{where} cannot make {request.size} images: {problem}.")
        if request.quality is not None and request.quality not in self.qualities:
            raise InvalidRequestError(
                f"{where} has no {request.quality!r} quality: use {', '.join(self.qualities)}."
            )
        if request.n > self.max_n:
            raise InvalidRequestError(f"{where} makes at most {self.max_n} images a call.")
        output_format = request.output_format or "png"
        if output_format not in self.output_formats:
            raise InvalidRequestError(
                f"{where} cannot write {output_format}: use {', '.join(self.output_formats)}."
            )
        if request.background == "transparent" and output_format not in self.transparent_formats:
            raise InvalidRequestError(
                f"{where} makes transparent backgrounds only as "
                f"{' or '.join(self.transparent_formats)}, not {output_format}."
            )

    def price_per_image(self, quality: Quality | None, width: int, height: int) -> float | None:
        """USD for one image of this quality and size, without usage: the listed price,
        else the token estimate; `auto` (the default) is priced as high."""
        if self.flat_price_usd is not None:
            return self.flat_price_usd
        tier: Quality = "high" if quality in (None, "auto") else quality
        size = f"{width}x{height}"
        if self.image_prices is not None and tier in self.image_prices:
            price = self.image_prices[tier]
            if size == "1024x1024":
                return price.square
            if size in STANDARD_SIZES:
                return price.non_square
        if self.output_tokens is not None and self.token_prices is not None:
            tokens = self.output_tokens[tier] * width * height / REFERENCE_PIXELS
            return round(tokens) * self.token_prices.image_output / 1e6
        return None


_GPT_IMAGE_1_5_TOKENS: dict[Quality, int] = {"low": 272, "medium": 1056, "high": 4160}
"""Image output tokens of a 1024x1024 image; a 1536x1024 one takes 1.5 times as many."""

_FREE_SIZES = SizeRule()

MODELS: dict[str, ModelSpec] = {
    "gpt-image-1.5": ModelSpec(
        image_prices={
            "low": ImagePrice(square=0.009, non_square=0.013),
            "medium": ImagePrice(square=0.034, non_square=0.05),
            "high": ImagePrice(square=0.133, non_square=0.20),
        },
        token_prices=TokenPrices(text_input=5.0, image_input=8.0, image_output=32.0),
        output_tokens=_GPT_IMAGE_1_5_TOKENS,
    ),
    # OpenAI's pricing page lists no separate rates for gpt-image-2 in the sources this
    # table follows: it is priced at gpt-image-1.5's rates, an upper bound, until a block
    # override says otherwise.
    "gpt-image-2": ModelSpec(
        sizes=None,
        size_rule=_FREE_SIZES,
        token_prices=TokenPrices(text_input=5.0, image_input=8.0, image_output=32.0),
        output_tokens=_GPT_IMAGE_1_5_TOKENS,
    ),
    **{
        name: ModelSpec(
            sizes=None,
            size_rule=_FREE_SIZES,
            token_prices=TokenPrices(text_input=5.0, image_input=8.0, image_output=30.0),
            output_tokens=_GPT_IMAGE_1_5_TOKENS,
        )
        for name in (
            "gpt-image-2.5-sunburst",
            "gpt-image-2.5-flare",
            "gpt-image-2.6-sunburst",
            "gpt-image-2.6-flare",
        )
    },
}
"""The built-in table. gpt-image-1.5 shuts down on 2026-12-01; the gpt-image-2 family
replaces it."""

_DATED_SNAPSHOT_SEPARATOR = "-20"
"""`gpt-image-2-2026-04-21` is a dated snapshot of `gpt-image-2`, described by its entry."""


def model_spec(model: str, overrides: Mapping[str, ModelSpec] | None = None) -> ModelSpec:
    """The entry for `model`: a block's own entry first, then the built-in table (a dated
    snapshot takes its model's entry). An unknown model is a configuration error that
    says how to describe it."""
    for table in (overrides or {}, MODELS):
        if model in table:
            return table[model]
    base, separator, _ = model.partition(_DATED_SNAPSHOT_SEPARATOR)
    if separator and base in MODELS:
        return MODELS[base]
    raise ConfigurationError(
        f"Unknown model {model!r}: the built-in table knows {', '.join(MODELS)}. Describe it "
        "in the credentials block's `models` field, e.g. "
        f'models={{"{model}": {{"sizes": null, "size_rule": {{}}, '
        '"token_prices": {"text_input": 5, "image_input": 8, "image_output": 30}}}, '
        "or copy an entry of prefect_gpt_image.model_table.MODELS and edit it."
    )
