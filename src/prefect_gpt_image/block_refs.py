"""Turning what a user passes for a block (a block, a saved name, nothing) into the block."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from prefect.blocks.core import Block

from prefect_gpt_image.errors import ConfigurationError

if TYPE_CHECKING:
    from prefect_aws import S3Bucket

    from prefect_gpt_image.blocks.credentials import RapidAPICredentials


B = TypeVar("B", bound=Block)


def resolve_credentials(value: RapidAPICredentials | str | None) -> RapidAPICredentials:
    """A block as is, a saved block by name, or None for the environment (RAPIDAPI_KEY)."""
    from prefect_gpt_image.blocks.credentials import RapidAPICredentials

    if isinstance(value, RapidAPICredentials):
        return value
    if value is None:
        return RapidAPICredentials.from_env()
    return _load(RapidAPICredentials, value)


def resolve_bucket(value: S3Bucket | str) -> S3Bucket:
    """A block as is, `s3://bucket/folder` with the environment's AWS credentials, or a
    saved S3Bucket block by name."""
    from prefect_aws import AwsCredentials, S3Bucket

    if isinstance(value, S3Bucket):
        return value
    if value.startswith("s3://"):
        parts = urlsplit(value)
        return S3Bucket(
            bucket_name=parts.netloc,
            bucket_folder=parts.path.strip("/"),
            credentials=AwsCredentials(),
        )
    return _load(S3Bucket, value)


def _load(block_type: type[B], name: str) -> B:
    try:
        return block_type.load(name)  # type: ignore[return-value]
    except ValueError as exc:
        raise ConfigurationError(
            f"No saved {block_type.__name__} block named {name!r} ({exc}). Create it in the "
            "Prefect UI or with .save(), or pass the block itself."
        ) from None
