"""The generation cache key, in one place.

Two requests share a key, and so one paid generation, when they ask the same
model at the same endpoint for the same picture: prompt, size and extras. Where
the image is stored (bucket, prefix, name) and which key pays for it are not
part of it, so neither a new prefix nor a rotated key makes anyone pay twice.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from prefect_gpt_image.models import ImageRequest

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
