"""Today's endpoint, and the environment variables that stand in for a block.

GPT Image 1.5 is scheduled to shut down on 2026-12-01: everything that names it is
a default here, overridable in the block or the environment, never a constant
buried in the code that calls it.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_gpt_image._image_sizes import IMAGE_SIZES

DEFAULT_API_HOST = "gpt-image-1-5.p.rapidapi.com"
DEFAULT_PATH = "/generate"
DEFAULT_MODEL = "gpt-image-1.5"
DEFAULT_TIMEOUT_SECONDS = 300.0
"""High-quality generations can take well over a minute."""
DEFAULT_PRICE_PER_IMAGE_USD = 0.03
DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024
DEFAULT_SUPPORTED_SIZES = IMAGE_SIZES


class RapidAPISettings(BaseSettings):
    """Configuration read from the environment when no credentials block is given."""

    model_config = SettingsConfigDict(extra="ignore")

    api_key: SecretStr | None = Field(default=None, validation_alias="RAPIDAPI_KEY")
    api_host: str = Field(default=DEFAULT_API_HOST, validation_alias="RAPIDAPI_HOST")
    base_url: str | None = Field(default=None, validation_alias="RAPIDAPI_BASE_URL")
    path: str = Field(default=DEFAULT_PATH, validation_alias="GPT_IMAGE_PATH")
    model: str = Field(default=DEFAULT_MODEL, validation_alias="GPT_IMAGE_MODEL")
    timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_SECONDS, validation_alias="GPT_IMAGE_TIMEOUT_SECONDS"
    )
    price_per_image_usd: float = Field(
        default=DEFAULT_PRICE_PER_IMAGE_USD, validation_alias="GPT_IMAGE_PRICE_USD"
    )


class LockSettings(BaseSettings):
    """Where the generation cache's locks live, when not in files on this machine."""

    model_config = SettingsConfigDict(extra="ignore")

    redis_lock_url: str | None = Field(default=None, validation_alias="GPT_IMAGE_REDIS_LOCK_URL")
