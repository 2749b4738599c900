"""The structures that cross a boundary: into a task, out of a flow, into the bucket."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefect_gpt_image._form_schema import OptionGroup
from prefect_gpt_image._object_keys import s3_uri
from prefect_gpt_image.model_table import (
    Background,
    Complexity,
    Moderation,
    OutputFormat,
    Quality,
)

MAX_PROMPT_CHARS = 32_000
"""GPT Image's limit on prompt length."""
MAX_IMAGES_PER_CALL = 10
"""The most images one call may ask for (`n`), on every GPT Image model."""
MAX_INPUT_IMAGES = 16
"""The most images one edit may take."""

InputFidelity = Literal["high", "low"]

# Tabs and line breaks are ordinary prompt text; other control characters are not.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_RESERVED_EXTRAS = frozenset({"prompt", "width", "height", "size", "model"})
_TYPED_FIELDS = (
    "quality",
    "complexity",
    "n",
    "output_format",
    "output_compression",
    "background",
    "moderation",
)


class InputImage(BaseModel):
    """An image given to an edit, checked before anything is paid: where it is, and what
    its bytes were when they were checked. The cache key holds `sha256`, never `uri`."""

    model_config = ConfigDict(frozen=True)

    uri: str = Field(
        description="Where it is read from when its request is sent: `s3://bucket/key`, "
        "`file:///absolute/path`, or `bytes:` for bytes held in `data`."
    )
    sha256: str = Field(description="Hex SHA-256 of its bytes.")
    media_type: str = Field(description="image/png, image/jpeg or image/webp.")
    size: int = Field(description="Size in bytes.")
    width: int
    height: int
    data: bytes | None = Field(
        default=None,
        repr=False,
        exclude=True,
        description="The bytes, for an image given as bytes (never in records).",
    )

    @property
    def name(self) -> str:
        """A short name for object keys: the file's name without its extension, or the
        start of the SHA-256 for bytes."""
        if self.uri.startswith("s3://"):  # a key may hold '#' and '?' as they are
            path = self.uri.removeprefix("s3://").partition("/")[2]
        elif self.uri.startswith("file:"):  # percent-encoded
            path = url2pathname(urlsplit(self.uri).path)
        else:
            path = ""
        return PurePosixPath(path).stem or self.sha256[:12]


class ImageRequest(BaseModel):
    """One image to generate, or, with `images`, to make by editing them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(
        description="What the image should show.", min_length=1, max_length=MAX_PROMPT_CHARS
    )
    width: int = Field(default=1024, ge=64, le=4096, description="Width in pixels.")
    height: int = Field(default=1024, ge=64, le=4096, description="Height in pixels.")
    name: str | None = Field(
        default=None,
        max_length=200,
        description="A readable name for the stored object; defaults to the prompt.",
    )
    quality: Quality | None = Field(
        default=None,
        description="low, medium, high or auto (xhigh and max on gpt-image-2.5 and 2.6); None "
        "for the model's default.",
    )
    complexity: Complexity | None = Field(
        default=None,
        description="How much the model plans the image: low, medium or high (gpt-image-2.6); "
        "None for the model's default.",
    )
    n: int = Field(
        default=1,
        ge=1,
        le=MAX_IMAGES_PER_CALL,
        description="Variants of the prompt to make in one call; each is stored and billed.",
    )
    output_format: OutputFormat | None = Field(
        default=None, description="png, jpeg or webp; None for the model's default (png)."
    )
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="Compression of jpeg and webp output, in %."
    )
    background: Background | None = Field(
        default=None, description="transparent, opaque or auto (transparent needs png or webp)."
    )
    moderation: Moderation | None = Field(
        default=None, description="Content moderation strictness: low or auto."
    )
    extras: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields passed through to the API as they are, for what is not typed.",
    )
    images: tuple[InputImage | bytes | str, ...] = Field(
        default=(),
        max_length=MAX_INPUT_IMAGES,
        description="For an edit, the images to edit (1 to 16): local paths, s3:// URIs, "
        "bytes or StoredImages. Each is checked before anything is paid, and read when the "
        "request is sent.",
    )
    mask: InputImage | bytes | str | None = Field(
        default=None,
        description="For an edit, a PNG the size of the first image whose transparent "
        "pixels mark the area to repaint.",
    )
    input_fidelity: InputFidelity | None = Field(
        default=None,
        description="For an edit, how closely to keep the inputs' features: high or low.",
    )
    focus: tuple[float, float] | None = Field(
        default=None,
        description="For placements: the point each cropped rendition is centred on, as "
        "fractions of the width and height (0.5, 0.5 is the centre); None: the centre. It "
        "is not sent to the API, so it never changes the generation or its cache key.",
    )

    @field_validator("focus", mode="before")
    @classmethod
    def _focus_from_text(cls, value: Any) -> Any:
        """A prompt file's `focus` cell, "0.5,0.3", is the pair it reads as."""
        if isinstance(value, str):
            parts = value.replace(" ", ",").split(",")
            return tuple(part for part in parts if part)
        return value

    @field_validator("focus")
    @classmethod
    def _focus_within(cls, focus: tuple[float, float] | None) -> tuple[float, float] | None:
        if focus is not None and not all(0 <= part <= 1 for part in focus):
            raise ValueError("focus is two fractions between 0 and 1, such as (0.5, 0.3)")
        return focus

    @model_validator(mode="before")
    @classmethod
    def _typed_fields_out_of_extras(cls, data: Any) -> Any:
        """`extras={"quality": "high"}` is `quality="high"`: checked against the model, and
        every image an `n` asks for is stored."""
        if not isinstance(data, dict) or not isinstance(data.get("extras"), dict):
            return data
        extras = dict(data["extras"])
        data = dict(data)
        for field in _TYPED_FIELDS:
            if field in extras:
                value = extras.pop(field)
                if data.get(field) not in (None, value):
                    raise ValueError(f"{field} is given twice, as a field and in extras")
                data[field] = value
        data["extras"] = extras
        return data

    @field_validator("images", "mask", mode="before")
    @classmethod
    def _inputs_as_given(cls, value: Any) -> Any:
        """A path is its text, a stored image its `s3://` URI."""
        if isinstance(value, list | tuple):
            return tuple(_input_ref(item) for item in value)
        return _input_ref(value)

    @model_validator(mode="after")
    def _edit_fields_need_images(self) -> ImageRequest:
        if not self.images:
            for field in ("mask", "input_fidelity"):
                if getattr(self, field) is not None:
                    raise ValueError(f"{field} is for edits: give the images to edit as well")
        return self

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is empty or only whitespace")
        if match := _CONTROL_CHARS.search(prompt):
            raise ValueError(
                f"the prompt holds a control character ({match.group()!r}) "
                f"at position {match.start()}"
            )
        return prompt

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str | None) -> str | None:
        if name is not None and _CONTROL_CHARS.search(name):
            raise ValueError("the name holds a control character")
        return name

    @field_validator("extras")
    @classmethod
    def _check_extras(cls, extras: dict[str, Any]) -> dict[str, Any]:
        if clash := _RESERVED_EXTRAS & extras.keys():
            raise ValueError(f"extras may not set {sorted(clash)}: use the request's own fields")
        return extras

    @property
    def inputs(self) -> list[InputImage]:
        """An edit's checked images, then its mask."""
        refs = [*self.images, *([self.mask] if self.mask is not None else [])]
        return [ref for ref in refs if isinstance(ref, InputImage)]

    @property
    def is_edit(self) -> bool:
        """Whether this request edits input images rather than generating from nothing."""
        return bool(self.images)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def title(self) -> str:
        """What the request is called: its name, or else its prompt. Object keys, task-run
        names, logs and the gallery all name it by this."""
        return title_of(self.name, self.prompt)

    @property
    def label(self) -> str:
        """The title, short and on one line, for logs and task-run names."""
        text = " ".join(self.title.split())
        return text if len(text) <= 60 else text[:57] + "..."


def _input_ref(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, StoredImage):
        return value.uri
    return value


def title_of(name: str | None, prompt: str) -> str:
    """What a request is called: its name, or else its prompt."""
    return name or prompt


def as_request(request: ImageRequest | str) -> ImageRequest:
    """A request, from a request or a bare prompt."""
    return request if isinstance(request, ImageRequest) else ImageRequest(prompt=request)


class ApiLimits(OptionGroup):
    """How busy a process may keep the API: the plan's limits, as far as the caller knows.

    Enforced per process and per key by `prefect_gpt_image._throttle`; across workers,
    name a Prefect global concurrency limit. In a flow run, fields left at their default
    come from `GPT_IMAGE_*` environment settings (see `prefect_gpt_image.settings`).
    """

    max_concurrency: int = Field(
        default=8, ge=1, le=256, description="Requests in flight at once, in this process."
    )
    requests_per_second: float | None = Field(
        allow_inf_nan=False,
        default=None,
        gt=0,
        le=1000,
        description="Requests started per second, in this process: the plan's rate limit. "
        "Empty: learned from the API's 429s and rate-limit headers.",
    )
    global_concurrency_limit: str | None = Field(
        default=None,
        min_length=1,
        description="The name of a Prefect global concurrency limit every request holds a "
        "slot of while it runs: a cap on requests in flight across workers. Empty: none.",
    )
    global_rate_limit: str | None = Field(
        default=None,
        min_length=1,
        description="The name of a Prefect global concurrency limit with slot decay every "
        "request takes a slot of: a rate limit across workers. Empty: none.",
    )


class Usage(BaseModel):
    """The tokens a call used, as the provider reported them."""

    input_tokens: int = 0
    output_tokens: int = 0
    text_input_tokens: int = 0
    image_input_tokens: int = 0
    cached_text_input_tokens: int = Field(
        default=0, description="Of the text input tokens, those read from the cache."
    )
    cached_image_input_tokens: int = Field(
        default=0, description="Of the image input tokens, those read from the cache."
    )


class ImageFile(BaseModel):
    """One encoded image, checked."""

    data: bytes = Field(repr=False, description="The encoded image.")
    media_type: str = Field(description="image/png, image/jpeg or image/webp.")
    sha256: str = Field(description="Hex SHA-256 of `data`.")
    width: int
    height: int


class GeneratedImage(BaseModel):
    """An image as the API produced it, downloaded and checked.

    It is the generation task's persisted result, which is what lets a later run
    (or the upload after an S3 outage) use it without paying again. A call asking for
    `n` images returns them all: this one, and `more_images`.
    """

    data: bytes = Field(repr=False, description="The encoded image.")
    media_type: str = Field(description="image/png, image/jpeg or image/webp.")
    sha256: str = Field(description="Hex SHA-256 of `data`.")
    width: int
    height: int
    request: ImageRequest
    model: str = Field(description="The model that made it.")
    route: str = Field(default="", description="The route that made it: a block's name or host.")
    source_url: str | None = Field(
        default=None, description="Where the API served it; None for inline answers."
    )
    generated_at: datetime
    paid_calls: int = Field(
        default=1,
        description="Answers the API charged for to make this image: more than one when "
        "a broken answer had to be generated again.",
    )
    cost_usd: float = Field(
        default=0.0, description="What the call (and any charged broken answers) cost."
    )
    possibly_charged_usd: float = Field(
        default=0.0,
        description="What calls that timed out after they were sent may have cost: the "
        "provider may have finished, and billed, generations nobody received.",
    )
    usage: Usage | None = Field(default=None, description="Tokens used, where reported.")
    variant: int = Field(default=0, description="Its place among the call's images.")
    more_images: list[ImageFile] = Field(
        default_factory=list, repr=False, description="The call's other images, in order."
    )

    @property
    def extension(self) -> str:
        return {"image/jpeg": "jpg", "image/webp": "webp"}.get(self.media_type, "png")

    @property
    def image_count(self) -> int:
        return 1 + len(self.more_images)

    def variants(self) -> list[GeneratedImage]:
        """Every image of the call, each as a `GeneratedImage` of its own with its share of
        the cost, for storing."""
        if not self.more_images:
            return [self]
        share = round(self.cost_usd / self.image_count, 6)
        first = self.model_copy(update={"more_images": [], "cost_usd": share})
        return [first] + [
            first.model_copy(update={**other.model_dump(), "variant": number})
            for number, other in enumerate(self.more_images, 1)
        ]


class StoredImage(BaseModel):
    """An image in the bucket."""

    bucket: str
    key: str
    uri: str = Field(description="s3://bucket/key")
    sha256: str
    size: int = Field(description="Size in bytes.")
    media_type: str
    width: int
    height: int
    prompt: str
    name: str | None = None
    model: str
    route: str = Field(default="", description="The route that made it.")
    cost_usd: float = Field(default=0.0, description="Its share of what its call cost.")
    variant: int = Field(default=0, description="Its place among its call's images.")
    inputs: list[InputImage] = Field(
        default_factory=list,
        description="For an edit, the images it edited, then its mask: where each was read "
        "from, and its SHA-256.",
    )
    more_images: list[StoredImage] = Field(
        default_factory=list,
        description="The other images of its call, where `upload_image` stored them all.",
    )
    placement: str | None = Field(
        default=None,
        description="For a rendition, the placement it was made for; None for a master (an "
        "image as the API made it).",
    )
    source_sha256: str | None = Field(
        default=None, description="For a rendition, the SHA-256 of the master it comes from."
    )
    cropped: float | None = Field(
        default=None,
        description="For a rendition, the share of its source's area cut away to reach the "
        "placement's aspect (0 to 1).",
    )

    @property
    def title(self) -> str:
        return title_of(self.name, self.prompt)

    @property
    def is_rendition(self) -> bool:
        return self.placement is not None

    @property
    def file_name(self) -> str:
        """Its object's name in its folder: unique within a run, the name it is reviewed as."""
        return self.key.rsplit("/", 1)[-1]

    @classmethod
    def of(cls, image: GeneratedImage, bucket: str, key: str) -> StoredImage:
        """The record of `image` stored at `key`."""
        return cls(
            bucket=bucket,
            key=key,
            uri=s3_uri(bucket, key),
            sha256=image.sha256,
            size=len(image.data),
            media_type=image.media_type,
            width=image.width,
            height=image.height,
            prompt=image.request.prompt,
            name=image.request.name,
            model=image.model,
            route=image.route,
            cost_usd=image.cost_usd,
            variant=image.variant,
            inputs=image.request.inputs,
        )


FailureStage = Literal["check", "generate", "upload", "render", "not attempted"]


class PromptFailure(BaseModel):
    """A prompt that did not end in the bucket, and why."""

    prompt: str
    name: str | None = None
    error: str = Field(description="What went wrong, as the user should read it.")
    error_type: str = Field(description="The exception class, e.g. PromptRejectedError.")
    stage: FailureStage = Field(
        description="Where it failed: 'check' for an input refused before anything was "
        "sent; 'render' for a rendition; 'not attempted' when the run stopped before it."
    )
    placement: str | None = Field(
        default=None, description="For a rendition that failed alone, its placement."
    )


class WaitingPrompt(BaseModel):
    """A prompt sent through OpenAI's Batch API whose batch was still running when the run
    stopped waiting: the next run with the same prompts collects it, and pays nothing more."""

    prompt: str
    name: str | None = None
    batch_id: str = Field(description="The batch that holds it.")


class RunReport(BaseModel):
    """What a `generate_images` run produced and what it cost."""

    images: list[StoredImage] = Field(default_factory=list)
    failures: list[PromptFailure] = Field(default_factory=list)
    manifest_key: str | None = None
    manifest_uri: str | None = None
    generated: int = Field(default=0, description="Images paid for in this run.")
    from_cache: int = Field(default=0, description="Images served from the cache, at no cost.")
    cost_usd: float = Field(default=0.0, description="What this run's generations cost.")
    possibly_charged_usd: float = Field(
        default=0.0,
        description="What calls that timed out after they were sent may have cost, apart "
        "from `cost_usd`: the provider may have billed them.",
    )
    waiting: list[WaitingPrompt] = Field(
        default_factory=list,
        description="Prompts still in running OpenAI batches: a later run collects them.",
    )
    synchronous_cost_usd: float | None = Field(
        default=None,
        description="Through the Batch API: what the same images would have cost synchronously.",
    )

    def summary(self) -> str:
        possibly = (
            f" (and up to ${self.possibly_charged_usd:.2f} for calls that timed out)"
            if self.possibly_charged_usd
            else ""
        )
        waiting = (
            f", {len(self.waiting)} waiting in OpenAI batches (run again to collect them)"
            if self.waiting
            else ""
        )
        price = (
            f" at the batch price (${self.synchronous_cost_usd:.2f} synchronously)"
            if self.synchronous_cost_usd is not None
            else ""
        )
        renditions = sum(image.is_rendition for image in self.images)
        masters = len(self.images) - renditions
        stored = (
            f"{masters} image{'s' * (masters != 1)} and {renditions} "
            f"rendition{'s' * (renditions != 1)} stored"
            if renditions
            else f"{len(self.images)} stored"
        )
        return (
            f"{stored}, {len(self.failures)} failed{waiting}; "
            f"{self.generated} generated, {self.from_cache} from cache; "
            f"cost ${self.cost_usd:.2f}{price}{possibly}"
        )
