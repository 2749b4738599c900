"""Turning what a user passes for a block (a block, a saved name, nothing) into the block:
the tasks and flows take either, and load names here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from prefect.blocks.core import Block

from prefect_gpt_image.blocks._route import GptImageRoute
from prefect_gpt_image.blocks.credentials import RapidAPICredentials
from prefect_gpt_image.blocks.openai_credentials import OpenAICredentials
from prefect_gpt_image.errors import ConfigurationError

if TYPE_CHECKING:
    from prefect_aws import S3Bucket

    from prefect_gpt_image._routes import Route


B = TypeVar("B", bound=Block)

RouteRef = RapidAPICredentials | OpenAICredentials | str
Routes = RouteRef | Sequence[RouteRef] | None
"""What a user passes for `credentials`: a block, a saved block's name, an ordered list of
those (the first is tried first), or None for the environment (RAPIDAPI_KEY)."""


def resolve_routes(value: Routes | GptImageRoute) -> list[Route]:
    """The routes `value` names, in order, loaded; at least one."""
    if value is None:
        return [RapidAPICredentials.from_env()]
    refs: list[RouteRef | GptImageRoute] = (
        [value] if isinstance(value, str | GptImageRoute) else list(value)
    )
    if not refs:
        raise ConfigurationError("credentials is an empty list: give at least one route.")
    return [_route(ref) for ref in refs]


def _route(ref: RouteRef | GptImageRoute) -> GptImageRoute:
    if isinstance(ref, GptImageRoute):
        return ref
    if not isinstance(ref, str):
        raise ConfigurationError(
            f"credentials holds a {type(ref).__name__}: give credentials blocks or their names."
        )
    for block_type in (RapidAPICredentials, OpenAICredentials):
        try:
            return block_type.load(ref, _sync=True)  # type: ignore[return-value, call-arg]
        except ValueError:
            continue
    raise ConfigurationError(
        f"No saved RapidAPICredentials or OpenAICredentials block named {ref!r}. Create it "
        "in the Prefect UI or with .save(), or pass the block itself."
    )


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
        return block_type.load(name, _sync=True)  # type: ignore[return-value, call-arg]
    except ValueError as exc:
        raise ConfigurationError(
            f"No saved {block_type.__name__} block named {name!r} ({exc}). Create it in the "
            "Prefect UI or with .save(), or pass the block itself."
        ) from None
