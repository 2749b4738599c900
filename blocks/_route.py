"""What every credentials block is: a route to a GPT Image model.

A route is a provider's endpoint, the key that unlocks it, and the model behind it. The
rest of the package speaks to routes only through this class, so a new provider is a new
block, not a change to the tasks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from prefect_gpt_image._redaction import without_userinfo
from prefect_gpt_image.errors import ConfigurationError
from prefect_gpt_image.model_table import MODELS, ModelSpec, model_spec
from prefect_gpt_image.settings import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_TIMEOUT_SECONDS

if TYPE_CHECKING:
    from prefect_gpt_image._client import AsyncGenerationClient, GenerationClient
    from prefect_gpt_image.models import ImageRequest


KEY_WHITESPACE_NOTE = "surrounding whitespace (a trailing newline from a secret file) is removed"
"""For each block's `api_key` description: the key is stripped, whatever the route."""


class _RefusedKey:
    """Why a key was refused, standing in for it in pydantic's error, which shows the
    input: the key itself never reaches the error."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return "'**********'"


class GptImageRoute(CredentialsBlock, ABC):
    """A provider's endpoint, its key and the model behind it (an interface: use
    `RapidAPICredentials` or `OpenAICredentials`)."""

    protocol_edits: ClassVar[bool] = True
    """Whether the route's protocol has image edits."""
    has_batch_api: ClassVar[bool] = False
    """Whether the route's provider has OpenAI's Batch API (the flow's `batch`)."""

    api_key: SecretStr = Field(
        default=...,
        title="API Key",
        description=f"The API key; {KEY_WHITESPACE_NOTE}.",
    )
    model: str = Field(
        default="gpt-image-1.5",
        description="The model to use; recorded with every image and part of the cache key.",
    )
    timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS,
        gt=0,
        description="How long to wait for one generation, in seconds.",
    )
    default_extras: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields sent with every request; a request's own fields win.",
    )
    max_image_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_BYTES,
        gt=0,
        description="The largest image accepted from the API, in bytes.",
    )
    models: dict[str, ModelSpec] = Field(
        default_factory=dict,
        description=(
            "Models this block describes itself: new models, or overrides of the built-in "
            "table's entries (sizes, qualities, formats, prices)."
        ),
    )
    model_aliases: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Which table entry a model name this endpoint uses is, for a gateway that names "
            "a model its own way: {'openai/gpt-image-2': 'gpt-image-2'}. The name is sent and "
            "recorded as given; the entry says what it accepts and costs."
        ),
    )

    # Pydantic runs "before" validators last-defined first: `_screen_api_key` runs first
    # and hands `_refuse_api_key` either the clean key or a `_RefusedKey`, so that an
    # error's `input` is never the key itself.
    @field_validator("api_key", mode="before")
    @classmethod
    def _refuse_api_key(cls, value: object) -> object:
        if isinstance(value, _RefusedKey):
            raise PydanticCustomError("api_key_refused", value.reason)
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _screen_api_key(cls, value: object) -> object:
        """The key without surrounding whitespace (a trailing newline from a secret file, a
        space from a paste); one that no HTTP header can carry is refused here, before any
        call could quote it in an error."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return _RefusedKey("The API key must be text.")
        key = value.strip()
        if not key:
            return _RefusedKey("The API key is empty: paste the key the provider gave you.")
        for position, char in enumerate(key, 1):
            if not " " <= char <= "~":
                kind = (
                    f"a control character (U+{ord(char):04X})"
                    if char.isascii()
                    else "a non-ASCII character"
                )
                return _RefusedKey(
                    f"The API key holds {kind} at position {position}, which an HTTP header "
                    "cannot carry: copy the key again from the provider's page."
                )
        return key

    @property
    @abstractmethod
    def endpoint_url(self) -> str:
        """The URL generation requests are posted to."""

    @property
    def shown_url(self) -> str:
        """The endpoint's URL as messages and logs show it: without any `user:password@`."""
        return without_userinfo(self.endpoint_url)

    @property
    def route_name(self) -> str:
        """How reports name this route: the saved block's name, else the endpoint's host
        and port (never a `user:password@` before them)."""
        return self._block_document_name or urlsplit(self.shown_url).netloc

    @model_validator(mode="after")
    def _aliases_name_entries(self) -> GptImageRoute:
        """An alias must name an entry that exists: a typo is refused when the block is
        made, not when a run is about to be paid for."""
        for name, entry in self.model_aliases.items():
            try:
                model_spec(entry, self.models)
            except ConfigurationError:
                raise ValueError(
                    f"model_aliases maps {name!r} to {entry!r}, which is not in the model "
                    f"table ({', '.join(MODELS)}) or the block's `models`."
                ) from None
        return self

    def model_spec(self) -> ModelSpec:
        """What the model accepts and costs on this route: its own entry, or the entry its
        alias names (`model_aliases`)."""
        try:
            return model_spec(self.model_aliases.get(self.model, self.model), self.models)
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"{exc} If {self.model!r} is this endpoint's name for a model in the table, "
                f"say which in `model_aliases`, e.g. model_aliases={{{self.model!r}: "
                "'gpt-image-2'}."
            ) from None

    def check_request(self, request: ImageRequest) -> None:
        """Refuse, before any paid call, a request this route's model cannot serve."""
        self.model_spec().check(self.model, request)

    def lacks(self, request: ImageRequest) -> str | None:
        """What `request` needs that this route does not have at all (an edit, a field its
        model does not take), or None: a route that lacks it is passed over."""
        if request.is_edit and not self.protocol_edits:
            return f"{self.route_name} does not edit images"
        return self.model_spec().lacks(self.model, request)

    @property
    def can_edit(self) -> bool:
        """Whether this route edits images: its protocol has edits, and its model makes them."""
        return self.protocol_edits and self.model_spec().edits

    @abstractmethod
    def cache_identity(self) -> dict[str, Any]:
        """What names the images this route makes in the cache: its endpoint and model,
        never its key."""

    @abstractmethod
    def get_client(self) -> GenerationClient:
        """A client for this route; connection pools are shared per process."""

    def get_async_client(self) -> AsyncGenerationClient:
        """`get_client` for async code: awaitable calls, the same throttle and pools."""
        from prefect_gpt_image._client import AsyncGenerationClient

        return AsyncGenerationClient(self.get_client())
