"""The model table, in one place: what each GPT Image model accepts, and what it charges.

Models are data, not code. A block can override an entry or add a model (its `models`
field), so a model launched tomorrow is a block edit, not a release. Each figure names its
source beside it. Where sources disagree on what a model takes, the entry refuses it
(nothing is paid for a request the provider might refuse or bill differently) and says so;
a block's entry for the model lifts the refusal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from prefect_gpt_image.errors import ConfigurationError, InvalidRequestError

if TYPE_CHECKING:
    from prefect_gpt_image.models import ImageRequest

Quality = Literal["low", "medium", "high", "xhigh", "max", "auto"]
Complexity = Literal["low", "medium", "high"]
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
    min_pixels: int = Field(
        default=655_360, ge=0, description="The smallest area allowed (1024x640)."
    )
    experimental_above_pixels: int | None = Field(
        default=2560 * 1440, description="Sizes above this area are experimental (a warning)."
    )

    def problem(self, width: int, height: int) -> str | None:
        """The rule `width`x`height` breaks, or None."""
        if width % self.multiple_of or height % self.multiple_of:
            return f"both sides must be multiples of {self.multiple_of}"
        if width * height < self.min_pixels:
            return (
                f"the size must be at least {self.min_pixels:,} pixels ({width * height:,} asked)"
            )
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
    cached_text_input: float | None = Field(
        default=None, ge=0, description="Per million cached text input tokens; None: as uncached."
    )
    cached_image_input: float | None = Field(
        default=None, ge=0, description="Per million cached image input tokens; None: as uncached."
    )


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
        default=["png", "webp"],
        description="Formats a transparent background works with; empty: it makes none.",
    )
    edits: bool = Field(default=True, description="Whether it edits images as well.")
    complexities: list[Complexity] = Field(
        default=[], description="The `complexity` settings it takes; empty: none."
    )
    input_fidelity: bool = Field(
        default=True, description="Whether an edit may set `input_fidelity`."
    )
    batch_api: bool = Field(
        default=True, description="Whether OpenAI's Batch API takes it (the flow's `batch`)."
    )
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

    def lacks(self, model: str, request: ImageRequest) -> str | None:
        """What `request` needs that this model does not have at all (a route whose model
        lacks it is passed over for another), or None."""
        where = f"{model} (prompt {request.label!r})"
        if request.is_edit and not self.edits:
            return f"{where} does not edit images"
        if request.input_fidelity is not None and not self.input_fidelity:
            return f"{where} does not take input_fidelity: leave it out"
        if request.background == "transparent" and not self.transparent_formats:
            return f"{where} makes no transparent backgrounds"
        if request.complexity is not None and not self.complexities:
            return f"{where} has no complexity setting: leave it out"
        return None

    def check(self, model: str, request: ImageRequest) -> None:
        """Refuse, before any paid call, a request this model cannot serve; the message
        names the rule it broke."""
        if (missing := self.lacks(model, request)) is not None:
            raise InvalidRequestError(f"{missing}.")
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
        if request.complexity is not None and request.complexity not in self.complexities:
            raise InvalidRequestError(
                f"{where} has no {request.complexity!r} complexity: use "
                f"{', '.join(self.complexities)}."
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
        else the token estimate; `auto` (the default) is priced as the model's dearest
        quality, which it may pick."""
        if self.flat_price_usd is not None:
            return self.flat_price_usd
        tier = self.priced_tier(quality)
        size = f"{width}x{height}"
        if self.image_prices is not None and tier in self.image_prices:
            price = self.image_prices[tier]
            if size == "1024x1024":
                return price.square
            if size in STANDARD_SIZES:
                return price.non_square
        if self.output_tokens and self.token_prices is not None:
            # A quality the entry gives no figure for is priced at its dearest figure.
            per_square = self.output_tokens.get(tier, max(self.output_tokens.values()))
            tokens = per_square * width * height / REFERENCE_PIXELS
            return round(tokens) * self.token_prices.image_output / 1e6
        return None

    def priced_tier(self, quality: Quality | None) -> Quality:
        """The quality a request is priced at: its own, or for `auto` (and None) the
        dearest the model has."""
        if quality is not None and quality != "auto":
            return quality
        return next((tier for tier in _DEAREST_FIRST if tier in self.qualities), "high")


_DEAREST_FIRST: tuple[Quality, ...] = ("max", "xhigh", "high", "medium", "low")

_GPT_IMAGE_1_5_TOKENS: dict[Quality, int] = {"low": 272, "medium": 1056, "high": 4160}
"""Image output tokens of a 1024x1024 image; a 1536x1024 one takes 1.5 times as many."""

_FREE_SIZES = SizeRule()
"""gpt-image-2 and later: sides multiples of 16, 1:3 to 3:1, at most 3840x2160 (OpenAI's API
reference for `size`, as openai-python 3.57 carries it), and between 655,360 and 8,294,400
pixels (the "current pixel limits" it points to, as gateways relaying the models publish
them, e.g. AnyFast's and fal's gpt-image-2 pages)."""

_GPT_IMAGE_2_PRICES = TokenPrices(
    text_input=5.0,
    image_input=8.0,
    image_output=30.0,
    cached_text_input=1.25,
    cached_image_input=2.0,
)
"""USD per million tokens: text in $5 (cached $1.25), image in $8 (cached $2), image out $30.
OpenAI's model pages (developers.openai.com/api/docs/models/gpt-image-2.6-sunburst lists all
five; gpt-image-1.5's image out was $32), matched by Vercel's and inference.sh's pages for
gpt-image-2, 2.5 and 2.6."""

_GPT_IMAGE_2_TOKENS: dict[Quality, int] = {"low": 200, "medium": 1767, "high": 7034}
"""Image output tokens of a 1024x1024 gpt-image-2 image: OpenAI's per-image estimates (low
$0.006, medium $0.053, high $0.211, as Lumenfall and Robots Atlas quote openai.com/api/pricing)
at $30 a million, rounded up. Other sizes scale with their area."""

_GPT_IMAGE_2_5_TOKENS: dict[Quality, int] = {
    **_GPT_IMAGE_2_TOKENS,
    # No published figure for xhigh and max: bounds assumed at twice and four times high,
    # so that a budget holds; a block's entry replaces them once the provider lists them.
    "xhigh": 2 * _GPT_IMAGE_2_TOKENS["high"],
    "max": 4 * _GPT_IMAGE_2_TOKENS["high"],
}
"""gpt-image-2.5: no per-image estimates of its own are published; gpt-image-2's, and the
assumed bounds above."""

_GPT_IMAGE_2_6_TOKENS: dict[Quality, int] = {
    **_GPT_IMAGE_2_5_TOKENS,
    # Gateways relaying 2.6 (LaoZhang's and APIYI's docs, November 2026): low and medium
    # take 3 to 4 times 2.5's tokens, high and above the same. The worst case takes 4 times.
    "low": 4 * _GPT_IMAGE_2_5_TOKENS["low"],
    "medium": 4 * _GPT_IMAGE_2_5_TOKENS["medium"],
}

_POST_1_5 = ModelSpec(
    sizes=None,
    size_rule=_FREE_SIZES,
    token_prices=_GPT_IMAGE_2_PRICES,
    output_tokens=_GPT_IMAGE_2_TOKENS,
)

MODELS: dict[str, ModelSpec] = {
    # Shut down on 2026-12-01 (OpenAI's deprecations page); kept for routes that still
    # serve it and for pricing its images in old reports.
    "gpt-image-1.5": ModelSpec(
        image_prices={
            "low": ImagePrice(square=0.009, non_square=0.013),
            "medium": ImagePrice(square=0.034, non_square=0.05),
            "high": ImagePrice(square=0.133, non_square=0.20),
        },
        token_prices=TokenPrices(text_input=5.0, image_input=8.0, image_output=32.0),
        output_tokens=_GPT_IMAGE_1_5_TOKENS,
    ),
    "gpt-image-2": _POST_1_5.model_copy(
        update={
            # OpenAI's per-image estimates (as quoted above); 1024x1536 and 1536x1024 take
            # fewer tokens than a square.
            "image_prices": {
                "low": ImagePrice(square=0.006, non_square=0.005),
                "medium": ImagePrice(square=0.053, non_square=0.041),
                "high": ImagePrice(square=0.211, non_square=0.165),
            },
            # OpenAI's API reference (openai-python 3.57, images.edit) says to omit
            # input_fidelity for gpt-image-2, and gateways such as Lumenfall refuse it (every
            # input is read at high fidelity); others (PMock) accept it. Sources disagree:
            # refused before paying.
            "input_fidelity": False,
            # OpenAI's API reference calls gpt-image-2's transparent backgrounds a preview;
            # a 400 "Transparent background is not supported for this model" was measured
            # through ofox.ai's gateway (2026-08-24) and XAI Router says unsupported, while
            # APIYI got alpha PNGs. Sources disagree: refused before paying.
            "transparent_formats": [],
            # OpenAI's model page (developers.openai.com/api/docs/models/gpt-image-2) lists
            # v1/batch as supported.
            "batch_api": True,
        }
    ),
    **{
        name: _POST_1_5.model_copy(
            update={
                # OpenAI's API reference (openai-python 3.57): 2.5 adds xhigh and max and
                # takes transparent backgrounds as png or webp. 2.6 keeps the six qualities
                # and adds `complexity`, low, medium or high (Apidog's and APIYI's guides
                # from OpenAI's docs; LaoZhang: at no extra charge).
                "qualities": ["low", "medium", "high", "xhigh", "max", "auto"],
                "output_tokens": tokens,
                "complexities": complexities,
                # Published sources disagree on whether the Batch API takes 2.5 and 2.6.
                # Refused before anything is sent; a block's entry with "batch_api": true
                # lifts it.
                "batch_api": False,
            }
        )
        for name, tokens, complexities in (
            ("gpt-image-2.5-sunburst", _GPT_IMAGE_2_5_TOKENS, []),
            ("gpt-image-2.5-flare", _GPT_IMAGE_2_5_TOKENS, []),
            ("gpt-image-2.6-sunburst", _GPT_IMAGE_2_6_TOKENS, ["low", "medium", "high"]),
            ("gpt-image-2.6-flare", _GPT_IMAGE_2_6_TOKENS, ["low", "medium", "high"]),
        )
    },
}
"""The built-in table. gpt-image-1.5, its snapshot and gpt-image-1-mini shut down on
2026-12-01; gpt-image-2 and the 2.5 and 2.6 sunburst and flare families replace them."""

SHUT_DOWN = frozenset({"gpt-image-1.5"})
"""Models in the table the provider no longer serves (OpenAI's deprecations page: 2026-12-01):
still priced, never suggested."""

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


def check_batch_api(
    model: str, spec: ModelSpec, overrides: Mapping[str, ModelSpec] | None = None
) -> None:
    """Refuse, before anything is sent, a Batch API run of `model` (described by `spec`,
    its own entry or the one its alias names) where the Batch API does not take it, naming
    the models that it does take."""
    if spec.batch_api:
        return
    table = {**MODELS, **(overrides or {})}
    able = [name for name, entry in table.items() if entry.batch_api and name not in SHUT_DOWN]
    raise InvalidRequestError(
        f"batch cannot send {model}: OpenAI's Batch API does not take it, as far as the "
        f"model table knows. It takes {', '.join(able)}; or turn batch off. If the "
        f"provider now takes {model} in batches, say so in the credentials block's `models`: "
        f'{{"{model}": {{..., "batch_api": true}}}}.'
    )
