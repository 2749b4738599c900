"""Checks before paying: configuration that would fail every request, or fail only after
every image is paid for, is found before the first call."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect_aws import S3Bucket

from prefect_gpt_image._object_keys import check_key_room, join_key
from prefect_gpt_image._redaction import without_userinfo
from prefect_gpt_image._storage import check_writable
from prefect_gpt_image.errors import ConfigurationError
from prefect_gpt_image.models import ApiLimits


def check_global_limits(limits: ApiLimits) -> None:
    """A global limit that does not exist would fail every request: say so before any."""
    names = [n for n in (limits.global_concurrency_limit, limits.global_rate_limit) if n]
    if not names:
        return
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                limit = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                raise ConfigurationError(
                    f"No Prefect global concurrency limit named {name!r}: create it with "
                    f"`prefect gcl create {name} --limit N` (add --slot-decay-per-second "
                    "for a rate limit)."
                ) from None
            if name == limits.global_rate_limit and not limit.slot_decay_per_second:
                raise ConfigurationError(
                    f"The global concurrency limit {name!r} has no slot decay, so it cannot "
                    "limit a rate: give it one, or pass it as limits.global_concurrency_limit."
                )


def check_redis(url: str) -> None:
    """An unreachable lock store would fail every request: say so before any."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=5).ping()
    except (redis.RedisError, ValueError) as exc:
        raise ConfigurationError(
            f"Cannot reach the Redis for the cache's locks at {without_userinfo(url)}: {exc}"
        ) from None


def check_storage(bucket: S3Bucket, folder: str, cache_bucket: S3Bucket | None) -> None:
    """A missing bucket, a wrong secret or a key too long would be found only after paying
    for every image: find them now."""
    check_key_room(bucket.bucket_folder, folder)
    check_writable(bucket, join_key(bucket.bucket_folder, folder))
    if cache_bucket is not None:
        check_writable(cache_bucket, cache_bucket.bucket_folder)


def saved_block(block: S3Bucket) -> S3Bucket:
    """Prefect stores a cache's location as a block reference: the block must be saved."""
    if block._block_document_id is None:
        raise ConfigurationError(
            "cache.storage must be a saved S3Bucket block (or its name): save it with "
            ".save('NAME') or in the Prefect UI, so that every worker can load it."
        )
    return block
