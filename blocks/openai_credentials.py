"""The OpenAI-protocol credentials block: OpenAI itself, Azure OpenAI, and gateways."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, HttpUrl, SecretStr, field_validator

from prefect_gpt_image.blocks._route import KEY_WHITESPACE_NOTE, GptImageRoute

if TYPE_CHECKING:
    from prefect_gpt_image._client import OpenAIClient
    from prefect_gpt_image._routes import OpenAIRoute

OPENAI_BASE_URL = "https://api.openai.com/v1"

AuthHeader = Literal["authorization", "api-key"]


class OpenAICredentials(GptImageRoute):
    """
    Block used to call GPT Image through the OpenAI protocol: OpenAI's API, Azure OpenAI's
    v1 endpoint, or an OpenAI-compatible gateway that hosts GPT Image.

    For Azure OpenAI, set `base_url` to `https://{resource}.openai.azure.com/openai/v1`,
    `auth_header` to `api-key`, and `model` to the deployment's name.

    Example:
        Load stored credentials:
        ```python
        from prefect_gpt_image import OpenAICredentials

        credentials = OpenAICredentials.load("BLOCK_NAME")
        ```

        Reach gpt-image-2 on Azure OpenAI:
        ```python
        from prefect_gpt_image import OpenAICredentials

        OpenAICredentials(
            api_key="AZURE-KEY",
            base_url="https://my-resource.openai.azure.com/openai/v1",
            auth_header="api-key",
            model="gpt-image-2",
        ).save("azure-gpt-image")
        ```
    """

    has_batch_api = True

    _block_type_name = "OpenAI Image Credentials"
    _description = (
        "An API key and endpoint for GPT Image through the OpenAI protocol: OpenAI, Azure "
        "OpenAI, or an OpenAI-compatible gateway."
    )
    _documentation_url = HttpUrl("https://pypi.org/project/prefect-gpt-image/")

    api_key: SecretStr = Field(
        default=...,
        title="API Key",
        description=(
            "The API key, sent as a bearer token or in Azure's api-key header; "
            f"{KEY_WHITESPACE_NOTE}."
        ),
    )
    model: str = Field(
        default="gpt-image-2",
        description="The model (on Azure, the deployment); recorded with every image.",
    )
    base_url: str = Field(
        default=OPENAI_BASE_URL,
        title="Base URL",
        description="The API's base URL, up to and including /v1.",
    )
    auth_header: AuthHeader = Field(
        default="authorization",
        description=(
            "How the key is sent: 'authorization' (Authorization: Bearer, OpenAI and most "
            "gateways) or 'api-key' (Azure OpenAI)."
        ),
    )
    organization: str | None = Field(
        default=None, description="The OpenAI organization to bill, if not the key's default."
    )
    project: str | None = Field(
        default=None, description="The OpenAI project to bill, if not the key's default."
    )

    batch_max_requests: int = Field(
        default=50_000,
        gt=0,
        description="The most requests one Batch API input file may hold; more are split.",
    )
    batch_max_file_bytes: int = Field(
        default=200_000_000,
        gt=0,
        description="The largest Batch API input file, in bytes; larger batches are split.",
    )

    @field_validator("base_url")
    @classmethod
    def _base_url_is_http(cls, base_url: str) -> str:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return base_url.rstrip("/")

    @property
    def endpoint_url(self) -> str:
        return f"{self.base_url}/images/generations"

    def cache_identity(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint_url, "model": self.model}

    def get_client(self) -> OpenAIClient:
        """A client for the route; its connection pool is shared per process."""
        from prefect_gpt_image._client import OpenAIClient

        return OpenAIClient(self)


if TYPE_CHECKING:  # mypy checks that the block is the route the package takes it for
    _MEETS: type[OpenAIRoute] = OpenAICredentials
