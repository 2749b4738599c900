"""Environment settings: those that stand in for a credentials block, and those that fill
a run's infrastructure options (`GPT_IMAGE_*`), so that a work pool's job variables set them
for every run.

Everything that names a model or an endpoint is a default here, overridable in the block
or the environment, never a constant buried in the code that calls it.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_gpt_image._form_schema import OptionGroup
from prefect_gpt_image._image_sizes import IMAGE_SIZES
from prefect_gpt_image.errors import ConfigurationError
from prefect_gpt_image.models import ApiLimits
from prefect_gpt_image.options import CacheOptions, LinkOptions

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


class CacheSettings(BaseSettings):
    """`CacheOptions` a work pool sets for every run: `GPT_IMAGE_CACHE_STORAGE`,
    `GPT_IMAGE_CACHE_EXPIRATION_DAYS` and `GPT_IMAGE_REDIS_LOCK_URL`."""

    model_config = SettingsConfigDict(env_prefix="GPT_IMAGE_CACHE_", extra="ignore")

    storage: str | None = None
    expiration_days: float | None = None
    redis_lock_url: str | None = Field(default=None, validation_alias="GPT_IMAGE_REDIS_LOCK_URL")


class LimitSettings(BaseSettings):
    """`ApiLimits` a work pool sets for every run: `GPT_IMAGE_MAX_CONCURRENCY`,
    `GPT_IMAGE_REQUESTS_PER_SECOND`, `GPT_IMAGE_GLOBAL_CONCURRENCY_LIMIT` and
    `GPT_IMAGE_GLOBAL_RATE_LIMIT`."""

    model_config = SettingsConfigDict(env_prefix="GPT_IMAGE_", extra="ignore")

    max_concurrency: int | None = None
    requests_per_second: float | None = None
    global_concurrency_limit: str | None = None
    global_rate_limit: str | None = None


class LinkSettings(BaseSettings):
    """`LinkOptions` a work pool sets for every run: `GPT_IMAGE_PUBLIC_BASE_URL` and
    `GPT_IMAGE_LINK_EXPIRY_HOURS`."""

    model_config = SettingsConfigDict(env_prefix="GPT_IMAGE_", extra="ignore")

    public_base_url: str | None = None
    expiry_hours: float | None = Field(default=None, validation_alias="GPT_IMAGE_LINK_EXPIRY_HOURS")


_SETTINGS: dict[type[OptionGroup], type[BaseSettings]] = {
    CacheOptions: CacheSettings,
    ApiLimits: LimitSettings,
    LinkOptions: LinkSettings,
}

Group = TypeVar("Group", bound=OptionGroup)


def with_environment(options: Group) -> Group:
    """`options`, each field the run left at its default taken from the environment's
    settings where one is set: the run's own value wins, then the work pool's."""
    try:
        environment = _SETTINGS[type(options)]().model_dump(exclude_unset=True)
        return type(options).model_validate({**environment, **options.given()})
    except ValidationError as exc:
        raise ConfigurationError(
            f"The GPT_IMAGE_* environment settings give invalid {type(options).__name__}: {exc}"
        ) from None
