"""The credentials block: the RapidAPI key and the endpoint it unlocks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, HttpUrl, SecretStr, ValidationError, field_validator

from prefect_gpt_image.blocks._route import KEY_WHITESPACE_NOTE, GptImageRoute
from prefect_gpt_image.errors import ConfigurationError
from prefect_gpt_image.model_table import ModelSpec
from prefect_gpt_image.settings import (
    DEFAULT_API_HOST,
    DEFAULT_MODEL,
    DEFAULT_PATH,
    DEFAULT_PRICE_PER_IMAGE_USD,
    DEFAULT_SUPPORTED_SIZES,
    RapidAPISettings,
)

if TYPE_CHECKING:
    from prefect_gpt_image._client import RapidAPIClient
    from prefect_gpt_image._routes import RapidAPIRoute


class RapidAPICredentials(GptImageRoute):
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

    protocol_edits: ClassVar[bool] = False
    """NexaAPI's endpoint generates only, as far as its documentation goes."""

    _block_type_name = "RapidAPI Credentials"
    _description = (
        "The RapidAPI key and endpoint used to generate images with GPT Image through NexaAPI."
    )
    _documentation_url = HttpUrl("https://pypi.org/project/prefect-gpt-image/")

    api_key: SecretStr = Field(
        default=...,
        title="API Key",
        description=(
            "The RapidAPI application key, sent as the x-rapidapi-key header; "
            f"{KEY_WHITESPACE_NOTE}."
        ),
    )
    model: str = Field(
        default=DEFAULT_MODEL,
        description="The model behind the endpoint; recorded with every image and cached result.",
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
    price_per_image_usd: float = Field(
        default=DEFAULT_PRICE_PER_IMAGE_USD,
        ge=0,
        title="Price per Image (USD)",
        description="What one generated image costs on this route, whatever its size.",
    )
    supported_sizes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SUPPORTED_SIZES),
        description=(
            "The WIDTHxHEIGHT sizes the endpoint makes; other sizes are refused before "
            "any paid call. Empty to follow the model's own sizes."
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
        try:
            return cls(**settings.model_dump())
        except ValidationError as exc:  # its messages never hold the key (see `api_key`)
            problems = "; ".join(str(error["msg"]) for error in exc.errors())
            raise ConfigurationError(f"RAPIDAPI_KEY and its siblings: {problems}") from None

    def model_spec(self) -> ModelSpec:
        """The model's entry, with this route's sizes and its flat price per image. The
        block describes its route's sizes and price itself, so a model the table does not
        know takes the defaults for the rest (qualities, formats, `n`)."""
        try:
            spec = super().model_spec()
        except ConfigurationError:
            spec = ModelSpec()
        update: dict[str, Any] = {"flat_price_usd": self.price_per_image_usd}
        if self.supported_sizes:
            update["sizes"] = list(self.supported_sizes)
        return spec.model_copy(update=update)

    def cache_identity(self) -> dict[str, Any]:
        identity: dict[str, Any] = {"host": self.api_host, "path": self.path, "model": self.model}
        if self.base_url is not None:
            identity["base_url"] = self.base_url
        return identity

    def get_client(self) -> RapidAPIClient:
        """A client for the generation endpoint; its connection pool is shared per process."""
        from prefect_gpt_image._client import RapidAPIClient

        return RapidAPIClient(self)


if TYPE_CHECKING:  # mypy checks that the block is the route the package takes it for
    _MEETS: type[RapidAPIRoute] = RapidAPICredentials
