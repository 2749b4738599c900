"""The generation cache, in one place: its key, and the policy the task runs under.

Two requests share a key, and so one paid generation, when they ask the same
model at the same endpoint for the same picture: prompt, size and extras. Where
the image is stored (bucket, prefix, name) and which key pays for it are not
part of it, so neither a new prefix nor a rotated key makes anyone pay twice.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.settings import get_current_settings

from prefect_gpt_image.block_refs import resolve_credentials
from prefect_gpt_image.locking import ProcessFileLockManager
from prefect_gpt_image.models import ImageRequest, as_request

if TYPE_CHECKING:
    from prefect_gpt_image.blocks.credentials import RapidAPICredentials

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

    The locks are files under Prefect's home, so they serialize runs on one machine.
    """
    locks = get_current_settings().home / "locks" / "prefect-gpt-image"
    return CachePolicy.from_cache_key_fn(_task_cache_key).configure(
        isolation_level="SERIALIZABLE", lock_manager=ProcessFileLockManager(locks)
    )


def _task_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return generation_cache_key(
        as_request(parameters["request"]), resolve_credentials(parameters.get("credentials"))
    )
