"""The generation cache, in one place: its key, and the policy the task runs under.

Two requests share a key, and so one paid generation, when they ask the same
model at the same endpoint for the same picture: prompt, size and extras. Where
the image is stored (bucket, prefix, name) and which key pays for it are not
part of it, so neither a new prefix nor a rotated key makes anyone pay twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, cast

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.results import ResultStore, get_result_store
from prefect.settings import get_current_settings

from prefect_gpt_image.block_refs import resolve_credentials
from prefect_gpt_image.locking import file_lock_manager
from prefect_gpt_image.models import GeneratedImage, ImageRequest, as_request

if TYPE_CHECKING:
    from prefect_gpt_image.blocks.credentials import RapidAPICredentials

logger = logging.getLogger(__name__)

CACHE_KEY_VERSION = 1
"""Bump when the key's recipe changes, so that old entries are not misread."""


def generation_cache_key(request: ImageRequest, credentials: RapidAPICredentials) -> str:
    identity = {
        "v": CACHE_KEY_VERSION,
        "host": credentials.api_host,
        "path": credentials.path,
        "model": credentials.model,
        "prompt": request.prompt,
        "width": request.width,
        "height": request.height,
        "extras": {**credentials.default_extras, **request.extras},
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return "gpt-image-" + hashlib.sha256(canonical.encode()).hexdigest()


def generation_cache_policy() -> CachePolicy:
    """Cache by `generation_cache_key`, SERIALIZABLE: of two runs asking for the same
    image at once, the second waits for the first's result instead of paying again.

    The locks are OS file locks under Prefect's home, so they serialize runs on one
    machine (see `prefect_gpt_image.locking`).
    """
    locks = get_current_settings().home / "locks" / "prefect-gpt-image"
    return CachePolicy.from_cache_key_fn(_task_cache_key).configure(
        isolation_level="SERIALIZABLE", lock_manager=file_lock_manager(locks)
    )


def _task_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return generation_cache_key(
        as_request(parameters["request"]), resolve_credentials(parameters.get("credentials"))
    )


def cache_store(task: Task[..., Any]) -> ResultStore:
    """The store `task` reads its cache from (its own result storage, else Prefect's), for
    reading only: without locks, which would wait for a run generating the same image
    (the task waits for it instead), and without keeping what it reads in memory."""
    store = cast(ResultStore, get_result_store().update_for_task(task, _sync=True))  # type: ignore[call-arg]
    return store.model_copy(update={"lock_manager": None, "cache_result_in_memory": False})


def cached_image(store: ResultStore, key: str) -> GeneratedImage | None:
    """The image cached under `key`, unless there is none or it has expired.

    This is the lookup the task makes before it runs, made without running it: a
    batch uses it to price its uncached part and to skip what is already done.
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
