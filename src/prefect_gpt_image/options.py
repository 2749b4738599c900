"""The `generate_images` flow's options, in groups: each group is a section of Prefect's run
form, a pydantic model in Python, and a plain mapping in a deployment's YAML.

Creative choices (`ImageOptions`, `EditOptions`, `PromptTemplate`) come first; delivery
(`BatchOptions`, `ReviewOptions`, and the `ReviewDecision` a reviewer gives); then what a
team sets once for every run (`ApiLimits` in `prefect_gpt_image.models`, `CacheOptions`,
`LinkOptions`), which environment settings fill too (`prefect_gpt_image.settings`).
"""

from __future__ import annotations

import re
from typing import Any

from prefect.input import RunInput
from prefect_aws import S3Bucket
from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefect_gpt_image._form_schema import OptionGroup
from prefect_gpt_image._image_sizes import parse_size
from prefect_gpt_image.model_table import (
    Background,
    Complexity,
    Moderation,
    OutputFormat,
    Quality,
)
from prefect_gpt_image.models import MAX_IMAGES_PER_CALL, InputFidelity

SIZE_PATTERN = r"^[1-9]\d*x[1-9]\d*$"


class ImageOptions(OptionGroup):
    """What every image looks like, for prompts that do not say otherwise.

    Example:
        ```python
        ImageOptions(size="1536x1024", quality="high", output_format="webp")
        ```
    """

    size: str = Field(
        default="1024x1024",
        json_schema_extra={"pattern": SIZE_PATTERN},
        description="WIDTHxHEIGHT: 1024x1024 (square), 1536x1024 (landscape), 1024x1536 "
        "(portrait), or any size the model makes (gpt-image-2: multiples of 16).",
    )
    quality: Quality | None = Field(
        default=None,
        description="low, medium, high or auto; xhigh and max on gpt-image-2.5 and 2.6. "
        "Empty: the model's default, priced as high.",
    )
    n: int = Field(
        default=1,
        ge=1,
        le=MAX_IMAGES_PER_CALL,
        description="Images per prompt; each is stored and billed.",
    )
    output_format: OutputFormat | None = Field(
        default=None, description="png, jpeg or webp. Empty: the model's default (png)."
    )
    output_compression: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="jpeg and webp compression, in %. Empty: the model's default.",
    )
    background: Background | None = Field(
        default=None,
        description="transparent (png or webp), opaque or auto. Empty: the model's default.",
    )
    moderation: Moderation | None = Field(
        default=None, description="low or auto. Empty: the model's default (auto)."
    )
    complexity: Complexity | None = Field(
        default=None,
        description="low, medium or high (gpt-image-2.6). Empty: the model's default.",
    )

    @field_validator("size")
    @classmethod
    def _width_x_height(cls, size: str) -> str:
        if not re.fullmatch(SIZE_PATTERN, size):
            raise ValueError(f"{size!r} is not WIDTHxHEIGHT in pixels, such as 1536x1024")
        return size

    def request_fields(self) -> dict[str, Any]:
        """The fields a prompt's request takes from these options."""
        width, height = parse_size(self.size)
        return {"width": width, "height": height, **self.model_dump(exclude={"size"})}


class EditOptions(OptionGroup):
    """Edit images instead of generating them: every prompt is applied to every image.

    Prompts that name their own images (a CSV `image` column, a JSONL `images` list) edit
    those instead.

    Example:
        ```python
        EditOptions(images="s3://brand/packshots/", input_fidelity="high")
        ```
    """

    images: list[str] | str | None = Field(
        default=None,
        description="Images to edit with every prompt: paths and s3:// URIs, or one s3:// "
        "folder or local directory of them. Empty: generate.",
    )
    mask: str | None = Field(
        default=None,
        description="A PNG the size of every input, whose transparent pixels mark the area "
        "to repaint. Empty: the model decides.",
    )
    input_fidelity: InputFidelity | None = Field(
        default=None,
        description="high or low: how closely to keep the inputs' features. Empty: the "
        "model's default.",
    )
    input_roots: list[str] = Field(
        default_factory=list,
        description="Folders (local, or s3://bucket/prefix/) whose images a prompt file may "
        "name, besides its own folder. A row naming an image anywhere else is refused, "
        "unread: the file does not decide what the worker reads.",
    )


class BatchOptions(OptionGroup):
    """Send the new requests through OpenAI's Batch API: half the price, answered within 24
    hours. A run collects what is ready and leaves the rest to a later run with the same
    prompts (a schedule every 15 minutes, say), which pays nothing more.

    Example:
        ```python
        BatchOptions(wait_minutes=0)  # send, and leave the collecting to later runs
        ```
    """

    enabled: bool = Field(
        default=True,
        description="Send through OpenAI's Batch API. Off: every image is generated now, at "
        "the full price.",
    )
    wait_minutes: float = Field(
        allow_inf_nan=False,
        default=10,
        ge=0,
        le=1440,
        description="How long this run waits for its batches before leaving them to a later run.",
    )
    cancel: bool = Field(
        default=False,
        description="Cancel the batches of these prompts, store what they answered already, "
        "and send nothing new.",
    )


SYNCHRONOUS = BatchOptions(enabled=False)
"""The flow's default: no Batch API, every image generated now."""


class ReviewOptions(OptionGroup):
    """A person approves each image before it is published: once every image is stored, the
    run waits for a decision in Prefect's UI, then copies what was approved to the publish
    folder, and edits what was rejected with a note, for the next round.

    Example:
        ```python
        ReviewOptions(publish_prefix="live", timeout_hours=48)
        ```
    """

    enabled: bool = Field(
        default=True,
        description="Wait for a person's approval before publishing. Off: nothing is "
        "published, and the run does not wait.",
    )
    publish_prefix: str = Field(
        default="published",
        min_length=1,
        description="The folder, within the run's folder, that approved images are copied "
        "to; nothing else is ever written there.",
    )
    timeout_hours: float = Field(
        allow_inf_nan=False,
        default=24,
        gt=0,
        le=24 * 30,
        description="How long a round waits for a decision; then the run fails, publishing "
        "nothing and keeping every image.",
    )
    max_rounds: int = Field(
        default=2,
        ge=1,
        le=10,
        description="Rounds of review, the first included: a rejection with a note in the "
        "last round drops the image instead of editing it.",
    )

    @field_validator("publish_prefix")
    @classmethod
    def _a_folder(cls, prefix: str) -> str:
        if not prefix.strip("/"):
            raise ValueError("publish_prefix names a folder, such as 'published'")
        return prefix


NO_REVIEW = ReviewOptions(enabled=False)
"""The flow's default: images are stored, and nothing is published."""


class ReviewDecision(RunInput):
    """A reviewer's decision on a round of a run's images, named as the run's gallery and
    table show them. Every image neither approved nor rejected is dropped: not published."""

    approve_all: bool = Field(default=False, description="Approve every image not rejected below.")
    approved: list[str] = Field(default_factory=list, description="The images to publish, by name.")
    rejected: dict[str, str] = Field(
        default_factory=dict,
        description="Image name → note. A note asks for a new version, edited from this one "
        "with the note, for the next round; an empty note drops the image.",
    )


class CacheOptions(OptionGroup):
    """The generation cache: a prompt asked for again is served from it, unpaid."""

    refresh: bool = Field(
        default=False,
        description="Generate again even where a cached image exists (and pay for it).",
    )
    expiration_days: float | None = Field(
        allow_inf_nan=False,
        default=None,
        gt=0,
        description="How long generated images are served from the cache. Empty: for good.",
    )
    storage: S3Bucket | str | None = Field(
        default=None,
        description="Where the cache lives, shared by workers on other machines: an S3Bucket "
        "block, a saved block's name, or s3://bucket/folder. Empty: Prefect's result storage.",
    )
    redis_lock_url: str | None = Field(
        default=None,
        description="A Redis (redis://host:6379/0) that holds the cache's locks, so that "
        "workers on several machines sharing `storage` pay once for a new image. Empty: "
        "files on this machine.",
    )


class LinkOptions(OptionGroup):
    """The links in the run's artifacts (the table and the gallery)."""

    public_base_url: str | None = Field(
        default=None,
        description="Where the bucket is served publicly (a CDN). Empty: presigned URLs.",
    )
    expiry_hours: float = Field(
        allow_inf_nan=False,
        default=24,
        gt=0,
        le=168,
        description="How long presigned links work, in hours.",
    )


class PromptTemplate(BaseModel):
    """A prompt with `{variables}`: every combination of their values is a prompt, named
    after its values.

    Example:
        ```python
        PromptTemplate(
            template="a {product} on a {background} background",
            variables={"product": ["mug", "tote bag"], "background": ["white", "oak"]},
        )
        ```
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = Field(
        min_length=1, description="The prompt, such as '{product} on a {background} table'."
    )
    variables: dict[str, list[str]] = Field(
        default_factory=dict, description="The values of each variable in the template."
    )
