"""What every credentials block is: a route to a GPT Image model.

A route is a provider's endpoint, the key that unlocks it, and the model behind it. The
rest of the package speaks to routes only through this class, so a new provider is a new
block, not a change to the tasks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, SecretStr

from prefect_gpt_image.model_table import ModelSpec, model_spec
from prefect_gpt_image.settings import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_TIMEOUT_SECONDS

if TYPE_CHECKING:
    from prefect_gpt_image.client import GenerationClient
    from prefect_gpt_image.models import ImageRequest


class GptImageRoute(CredentialsBlock, ABC):
    """A provider's endpoint, its key and the model behind it (an interface: use
    `RapidAPICredentials` or `OpenAICredentials`)."""

    api_key: SecretStr = Field(default=..., title="API Key", description="The API key.")
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

    @property
    @abstractmethod
    def endpoint_url(self) -> str:
        """The URL generation requests are posted to."""

    @property
    def route_name(self) -> str:
        """How reports name this route: the saved block's name, else the endpoint's host."""
        return self._block_document_name or urlsplit(self.endpoint_url).netloc

    def model_spec(self) -> ModelSpec:
        """What the model accepts and costs on this route."""
        return model_spec(self.model, self.models)

    def check_request(self, request: ImageRequest) -> None:
        """Refuse, before any paid call, a request this route's model cannot serve."""
        self.model_spec().check(self.model, request)

    @abstractmethod
    def cache_identity(self) -> dict[str, Any]:
        """What names the images this route makes in the cache: its endpoint and model,
        never its key."""

    @abstractmethod
    def get_client(self) -> GenerationClient:
        """A client for this route; connection pools are shared per process."""
