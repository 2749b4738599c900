"""The generation cache, in one place: its key, and the policy the task runs under.

Two requests share a key, and so one paid generation, when they ask the same
model at the same endpoint for the same picture: prompt, size and every field sent
with them. The endpoint is named by its URL, so an emulator's images never serve a
real endpoint's requests. Where the image is stored (bucket, prefix, name) and which
API key pays for it are not part of it, so neither a new prefix nor a rotated key makes
anyone pay twice.

A request with several routes is cached under a key of them all, and also under the
key of the route that made it: a later request through any one of those routes finds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from botocore.exceptions import ClientError
from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.locking.protocol import LockManager
from prefect.results import ResultStore, get_result_store
from prefect.settings import get_current_settings

from prefect_gpt_image._locking import file_lock_manager
from prefect_gpt_image._request_bodies import api_fields
from prefect_gpt_image._routes import serving_routes
from prefect_gpt_image._storage import error_code
from prefect_gpt_image.models import GeneratedImage, ImageRequest
from prefect_gpt_image.settings import CacheSettings

if TYPE_CHECKING:
    from prefect_gpt_image._routes import Route

logger = logging.getLogger(__name__)

CACHE_KEY_VERSION = 1
"""Bump when the key's recipe changes, so that old entries are not misread."""


def generation_cache_key(request: ImageRequest, route: Route) -> str:
    """The key of `request` made through `route`."""
    identity = {
        "v": CACHE_KEY_VERSION,
        **route.cache_identity(),
        "prompt": request.prompt,
        "width": request.width,
        "height": request.height,
        "extras": api_fields(request, route.default_extras),
        **_inputs_identity(request),
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return "gpt-image-" + hashlib.sha256(canonical.encode()).hexdigest()


def _inputs_identity(request: ImageRequest) -> dict[str, Any]:
    """An edit's inputs by their SHA-256, never their paths: the same photo under another
    name is the same edit, and a retouched one under the same name is another."""
    if not request.is_edit:
        return {}
    given = len(request.images) + (request.mask is not None)
    if len(request.inputs) != given:
        raise ValueError("an edit's inputs are checked before its cache key is made")
    return {"inputs": [image.sha256 for image in request.inputs], "mask": request.mask is not None}


def keys_by_route(request: ImageRequest, routes: Sequence[Route]) -> list[str]:
    """The key of `request` through each of the `routes` that serve it, in order."""
    return [generation_cache_key(request, route) for route in serving_routes(request, routes)]


def combined_key(route_keys: Sequence[str]) -> str:
    """The key of a request through all the routes that serve it, from their own keys
    (`keys_by_route`): the route's own key for one."""
    if len(route_keys) == 1:
        return route_keys[0]
    return "gpt-image-routes-" + hashlib.sha256(" ".join(route_keys).encode()).hexdigest()


CacheKeyFn = Callable[[TaskRunContext, dict[str, Any]], str]
"""How a task's parameters name its image: `combined_key` of its request's `keys_by_route`."""


def generation_cache_policy(
    cache_key_fn: CacheKeyFn, redis_lock_url: str | None = None
) -> CachePolicy:
    """Cache by `cache_key_fn`, SERIALIZABLE: of two runs asking for the same image at
    once, the second waits for the first's result instead of paying again.

    The locks are OS file locks under Prefect's home, which serialize runs on one machine
    (see `prefect_gpt_image._locking`), or, given a Redis URL (here, or in the
    `GPT_IMAGE_REDIS_LOCK_URL` environment variable), prefect-redis's locks in that Redis,
    which serialize runs on every machine that reaches it.
    """
    return CachePolicy.from_cache_key_fn(cache_key_fn).configure(
        isolation_level="SERIALIZABLE", lock_manager=_lock_manager(redis_lock_url)
    )


def with_locks_in(policy: CachePolicy, redis_lock_url: str) -> CachePolicy:
    """`policy`, a `generation_cache_policy`, with its locks in the Redis at the URL."""
    return dataclasses.replace(policy, lock_manager=_lock_manager(redis_lock_url))


def _lock_manager(redis_lock_url: str | None) -> LockManager:
    url = redis_lock_url or CacheSettings().redis_lock_url
    if url:
        from prefect_redis.locking import RedisLockManager

        manager: LockManager = RedisLockManager(connection_url=url)
        return manager
    return file_lock_manager(get_current_settings().home / "locks" / "prefect-gpt-image")


def cache_store(task: Task[..., Any]) -> ResultStore:
    """The store `task` reads its cache from (its own result storage, else Prefect's), for
    reading only: without locks, which would wait for a run generating the same image
    (the task waits for it instead), and without keeping what it reads in memory."""
    store = cast(ResultStore, get_result_store().update_for_task(task, _sync=True))  # type: ignore[call-arg]
    return store.model_copy(update={"lock_manager": None, "cache_result_in_memory": False})


def cached_image(store: ResultStore, key: str) -> GeneratedImage | None:
    """The image cached under `key`, unless there is none or it has expired.

    This is the lookup the task makes before it runs, made without running it: a
    run uses it to price its uncached part and to skip what is already done.
    """
    try:
        record = store.read(key)
    except Exception as exc:  # missing, or unreadable: either way the task would pay
        logger.debug("No cached image under %s: %s", key, exc)
        return None
    expiration = record.metadata.expiration
    if expiration is not None and expiration <= datetime.now(timezone.utc):
        return None
    return record.result if isinstance(record.result, GeneratedImage) else None


def lookup_keys(route_keys: Sequence[str]) -> list[str]:
    """Where a request may already be cached, from its routes' own keys (`keys_by_route`):
    under its key, then under each route's own."""
    return list(route_keys) if len(route_keys) == 1 else [combined_key(route_keys), *route_keys]


def find_cached(store: ResultStore, keys: Sequence[str]) -> GeneratedImage | None:
    """The first image cached under any of `keys`."""
    for key in keys:
        if (image := cached_image(store, key)) is not None:
            return image
    return None


def remember(
    store: ResultStore,
    key: str,
    image: GeneratedImage,
    expiration: timedelta | None,
    fallback: ResultStore | None = None,
    *,
    replace: bool = False,
) -> bool:
    """Cache `image` under `key`, where no task run did: under the key of the route that
    made it, or an image the Batch API made. Whether `store` holds an image under `key`
    now; if it did not take it, `fallback` (if given) keeps it instead.

    A different image already cached there stays, unless `replace` (`cache.refresh`):
    whoever was served it, and stored it, is served it again."""
    cached = None if replace else cached_image(store, key)
    if cached is not None and cached.sha256 != image.sha256:
        logger.warning(
            "Another image of %r is cached under %s already: it is kept, not replaced.",
            image.request.label,
            key,
        )
        return True
    until = datetime.now(timezone.utc) + expiration if expiration is not None else None
    try:
        store.write(image, key=key, expiration=until)  # type: ignore[arg-type]
        return True
    except Exception as exc:
        if fallback is None:  # the task's own record is written by Prefect: this is a bonus
            logger.warning("Could not cache the image under its route's key %s: %s", key, exc)
            return False
        logger.debug("Could not cache the image under %s: %s", key, exc)
    fallback.write(image, key=key)
    return False


class UnreadableRecord(Exception):
    """A record may be there but cannot be read: cut short, or its storage did not answer.
    Not the same as no record."""


def read_record(store: ResultStore, key: str) -> object | None:
    """What is recorded under `key`, or None if nothing is; raises `UnreadableRecord` where a
    record may be there but cannot be read."""
    try:
        result: object = store.read(key).result
    except Exception as exc:
        if _absent(store, key, exc):
            return None
        raise UnreadableRecord(f"the record {key} could not be read: {exc}") from exc
    return result


def _absent(store: ResultStore, key: str, exc: Exception) -> bool:
    """Whether `exc`, raised reading `key`, says there is no record (rather than a broken
    one, or a storage that did not answer)."""
    from prefect.filesystems import LocalFileSystem

    storage = store.metadata_storage or store.result_storage
    if isinstance(storage, LocalFileSystem) and storage.basepath:
        return not (Path(storage.basepath).expanduser() / key).exists()
    if isinstance(exc, FileNotFoundError):
        return True
    return isinstance(exc, ClientError) and error_code(exc) in ("404", "NoSuchKey", "NotFound")


def write_whole(store: ResultStore, key: str, obj: object) -> None:
    """Record `obj` under `key` so that a reader finds all of it or none of it, even if the
    writer is killed mid-write: on local storage, written beside the record and renamed over
    it (Prefect writes in place); an object store's put is whole already."""
    from prefect.filesystems import LocalFileSystem

    storage = store.result_storage
    if not isinstance(storage, LocalFileSystem) or store.metadata_storage is not None:
        store.write(obj, key=key)
        return
    record = store.create_result_record(obj, key=key)
    path = Path(str(record.metadata.storage_key))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        partial.write_bytes(record.serialize())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def stored_keys(store: ResultStore) -> set[str] | None:
    """The keys `store` holds, where that is one directory listing away (local storage):
    a run then reads only the records that exist. None where it is not."""
    from prefect.filesystems import LocalFileSystem

    storage = store.result_storage
    if not isinstance(storage, LocalFileSystem) or not storage.basepath:
        return None
    if store.metadata_storage is not None:
        return None
    try:
        return set(os.listdir(Path(storage.basepath).expanduser()))
    except FileNotFoundError:
        return set()
    except OSError:  # unreadable: let each read say what is wrong
        return None


def fallback_store() -> ResultStore:
    """Prefect's local result storage, where a paid image is kept when the configured cache
    storage cannot take it (an S3 cache that is down): never nowhere."""
    from prefect.filesystems import LocalFileSystem

    path = get_current_settings().results.local_storage_path
    return ResultStore(
        result_storage=LocalFileSystem(basepath=str(path)), cache_result_in_memory=False
    )


def is_fallback(store: ResultStore) -> bool:
    """Whether `store` keeps its records where `fallback_store` does: then there is no
    other place to look for them."""
    from prefect.filesystems import LocalFileSystem

    storage = store.result_storage
    if not isinstance(storage, LocalFileSystem) or not storage.basepath:
        return False
    fallback = Path(get_current_settings().results.local_storage_path).expanduser().resolve()
    return Path(storage.basepath).expanduser().resolve() == fallback


def ensure_kept(store: ResultStore, fallback: ResultStore, key: str, image: GeneratedImage) -> bool:
    """Whether the cache holds `image` under `key`; if it does not (its storage failed), keep
    it in `fallback` instead, so that the next run finds it there and does not pay again."""
    try:
        if store.exists(key):
            return True
    except Exception as exc:  # an unreachable store holds nothing we can count on
        logger.debug("Could not check the cache for %s: %s", key, exc)
    fallback.write(image, key=key)
    return False
