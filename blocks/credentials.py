"""The credentials block: the RapidAPI key and the endpoint it unlocks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, HttpUrl, SecretStr, field_validator

from prefect_gpt_image.errors import ConfigurationError, InvalidRequestError
from prefect_gpt_image.settings import (
    DEFAULT_API_HOST,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MODEL,
    DEFAULT_PATH,
    DEFAULT_PRICE_PER_IMAGE_USD,
    DEFAULT_SUPPORTED_SIZES,
    DEFAULT_TIMEOUT_SECONDS,
    RapidAPISettings,
)

if TYPE_CHECKING:
    from prefect_gpt_image.client import GptImageClient
    from prefect_gpt_image.models import ImageRequest


class RapidAPICredentials(CredentialsBlock):
    """
    Block used to call GPT Image through NexaAPI's endpoint on RapidAPI.

    Holds the RapidAPI key and the endpoint it is used with. The host, path and
    model are configuration: moving to a successor model is an edit of this block.

    Example:
        Load stored credentials:
        ```python
        from prefect_gpt_image import RapidAPICredentials

        credentials = RapidAPICredentials.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "RapidAPI Credentials"
    _description = (
        "The RapidAPI key and endpoint used to generate images with GPT Image through NexaAPI."
    )
    _documentation_url = HttpUrl("https://pypi.org/project/prefect-gpt-image/")

    api_key: SecretStr = Field(
        default=...,
        title="API Key",
        description="The RapidAPI application key, sent as the x-rapidapi-key header.",
    )
    api_host: str = Field(
        default=DEFAULT_API_HOST,
        title="API Host",
        description="The RapidAPI host of the model's API, sent as the x-rapidapi-host header.",
    )
    base_url: str | None = Field(
        default=None,
        title="Base URL",
        description=(
            "Where requests go; defaults to https://{api_host}. Set it to use a proxy "
            "or a local emulator."
        ),
    )
    path: str = Field(default=DEFAULT_PATH, description="The path of the generation endpoint.")
    model: str = Field(
        default=DEFAULT_MODEL,
        description="The model behind the endpoint; recorded with every image and cached result.",
    )
    default_extras: dict[str, Any] = Field(
        default_factory=dict,
        description="Model-specific fields sent with every request; a request's own extras win.",
    )
    timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS,
        gt=0,
        description="How long to wait for one generation, in seconds.",
    )
    price_per_image_usd: float = Field(
        default=DEFAULT_PRICE_PER_IMAGE_USD,
        ge=0,
        title="Price per Image (USD)",
        description="What one generated image costs, for cost reports.",
    )
    max_image_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_BYTES,
        gt=0,
        description="The largest image accepted from the API, in bytes.",
    )
    supported_sizes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SUPPORTED_SIZES),
        description=(
            "The WIDTHxHEIGHT sizes the model can produce; other sizes are refused before "
            "any paid call. Empty to allow any size."
        ),
    )

    @field_validator("path")
    @classmethod
    def _path_is_absolute(cls, path: str) -> str:
        return path if path.startswith("/") else "/" + path

    @field_validator("base_url")
    @classmethod
    def _base_url_is_http(cls, base_url: str | None) -> str | None:
        if base_url is not None and not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return base_url.rstrip("/") if base_url else base_url

    @property
    def endpoint_url(self) -> str:
        """The URL requests are posted to."""
        return f"{self.base_url or 'https://' + self.api_host}{self.path}"

    @classmethod
    def from_env(cls) -> RapidAPICredentials:
        """Build credentials from `RAPIDAPI_KEY`, `RAPIDAPI_HOST` and their siblings."""
        settings = RapidAPISettings()
        if settings.api_key is None:
            raise ConfigurationError(
                "No RapidAPI key: pass a RapidAPICredentials block (or its saved name), "
                "or set the RAPIDAPI_KEY environment variable."
            )
        return cls(**settings.model_dump())

    def check_request(self, request: ImageRequest) -> None:
        """Refuse, before any paid call, a request this model cannot serve."""
        if self.supported_sizes and request.size not in self.supported_sizes:
            raise InvalidRequestError(
                f"{self.model} cannot produce {request.size} images "
                f"(prompt {request.label!r}); supported sizes: "
                f"{', '.join(self.supported_sizes)}."
            )

    def get_client(self) -> GptImageClient:
        """A client for the generation endpoint; its connection pool is shared per process."""
        from prefect_gpt_image.client import GptImageClient

        return GptImageClient(self)
