"""Renditions into the bucket: each placement cut from its source image and stored beside the
master, or found there already.

A rendition is a pure function of its recipe (the master's and its source's SHA-256, the
placement, how it was adapted, the focus point), and its key holds the recipe's hash: a
re-run finds it with a HEAD and draws nothing, and a changed placement gets a new object.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING

from prefect_gpt_image._object_keys import check_bucket_name, rendition_key, s3_uri
from prefect_gpt_image._renditions import Rendition, RenditionError, decoded, render
from prefect_gpt_image._retry_policy import call_with_retries
from prefect_gpt_image._storage import image_metadata, put_bytes, stored_object
from prefect_gpt_image.errors import GptImageError
from prefect_gpt_image.models import GeneratedImage, ImageRequest, StoredImage
from prefect_gpt_image.placement_table import Adapt, Placement

if TYPE_CHECKING:
    from prefect_aws import S3Bucket

RENDITION_VERSION = 1
"""Bump when the way renditions are drawn changes, so that stored ones are drawn again."""
_DRAWERS = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="draw")
"""Renditions are drawn by a thread per CPU, one source each: more would not draw faster,
each would hold its source decoded, and the allocator would keep an arena of large buffers
for every upload thread that ever drew (twice the run's memory, measured)."""
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}


def store_renditions(
    source: GeneratedImage,
    placements: Sequence[Placement],
    bucket: S3Bucket,
    folder: str,
    request: ImageRequest,
    *,
    master_sha256: str,
    adapt: Adapt,
) -> list[StoredImage | GptImageError]:
    """Store `source`'s rendition for each of `placements`, for the concept `request` names:
    each record, or why it could not be made or stored (it fails alone). Storage is retried
    as an upload is."""
    check_bucket_name(bucket.bucket_name)
    image = source.model_copy(update={"request": request})
    planned = [
        (placement, _keys(bucket, folder, request, placement, image, master_sha256, adapt))
        for placement in placements
    ]
    outcomes: list[StoredImage | GptImageError | None] = []
    for _, keys in planned:  # found with a HEAD: a re-run draws nothing
        try:
            outcomes.append(call_with_retries(partial(_found_any, bucket, keys, image)))
        except GptImageError as exc:
            outcomes.append(exc)
    missing = [n for n, outcome in enumerate(outcomes) if outcome is None]
    drawn = _draw(source.data, [planned[n][0] for n in missing], request.focus or (0.5, 0.5))
    for n, rendition in zip(missing, drawn, strict=True):
        placement, keys = planned[n]
        if isinstance(rendition, GptImageError):  # a limit it cannot meet: it fails alone
            outcomes[n] = rendition
            continue
        key = next(k for k in keys if k.endswith("." + _extension(rendition)))
        metadata = _metadata(image, placement, rendition, master_sha256)
        put = partial(put_bytes, bucket, key, rendition.data, rendition.media_type, metadata)
        try:
            call_with_retries(put)
            outcomes[n] = _record(image, bucket.bucket_name, key, placement, rendition)
        except GptImageError as exc:  # storage that kept failing
            outcomes[n] = exc
    return [
        outcome.model_copy(update={"source_sha256": master_sha256})
        if isinstance(outcome, StoredImage)
        else outcome
        for outcome in outcomes
        if outcome is not None
    ]


def _draw(
    source: bytes, placements: Sequence[Placement], focus: tuple[float, float]
) -> list[Rendition | GptImageError]:
    """`source`'s renditions for `placements`, or why each cannot be drawn, by `_DRAWERS`."""
    if not placements:
        return []
    return _DRAWERS.submit(_draw_all, source, placements, focus).result()


def _draw_all(
    source: bytes, placements: Sequence[Placement], focus: tuple[float, float]
) -> list[Rendition | GptImageError]:
    picture = decoded(source)  # once, for all of them
    drawn: list[Rendition | GptImageError] = []
    for placement in placements:
        try:
            drawn.append(render(picture, placement, focus))
        except RenditionError as exc:
            drawn.append(exc)
    return drawn


def _keys(
    bucket: S3Bucket,
    folder: str,
    request: ImageRequest,
    placement: Placement,
    image: GeneratedImage,
    master_sha256: str,
    adapt: Adapt,
) -> list[str]:
    """The keys the rendition may be stored at, one per file type it may come out as."""
    recipe = _recipe(image, placement, master_sha256, adapt)
    return [
        rendition_key(
            bucket.bucket_folder, folder, request, placement.name, placement.size, recipe, ext
        )
        for ext in _extensions(placement)
    ]


def _recipe(image: GeneratedImage, placement: Placement, master_sha256: str, adapt: Adapt) -> str:
    identity = {
        "v": RENDITION_VERSION,
        "master": master_sha256,
        "source": image.sha256,
        "placement": placement.model_dump(mode="json", exclude={"source"}),
        "adapt": adapt,
        "focus": image.request.focus,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _extensions(placement: Placement) -> list[str]:
    """The file types the rendition may come out as: with no format given, PNG where it
    fits the byte limit, else JPEG."""
    if placement.output_format is not None:
        return [_EXTENSIONS[placement.output_format]]
    return ["png", "jpg"] if placement.max_bytes is not None else ["png"]


def _extension(rendition: Rendition) -> str:
    return {media: ext for ext, media in _MEDIA_TYPES.items()}[rendition.media_type]


def _found_any(bucket: S3Bucket, keys: list[str], image: GeneratedImage) -> StoredImage | None:
    return next((found for key in keys if (found := _found(bucket, key, image)) is not None), None)


def _found(bucket: S3Bucket, key: str, image: GeneratedImage) -> StoredImage | None:
    """The record of a rendition stored already, from its object's metadata."""
    existing = stored_object(bucket, key)
    if existing is None or "sha256" not in existing.metadata:
        return None
    meta = existing.metadata
    return StoredImage.of(image, bucket.bucket_name, key).model_copy(
        update={
            "sha256": meta["sha256"],
            "size": existing.size,
            "media_type": existing.content_type or _MEDIA_TYPES[key.rsplit(".", 1)[-1]],
            "width": int(meta.get("width", 0)),
            "height": int(meta.get("height", 0)),
            "cost_usd": 0.0,
            "placement": meta.get("placement"),
            "cropped": float(meta.get("cropped", 0.0)),
        }
    )


def _metadata(
    image: GeneratedImage, placement: Placement, rendition: Rendition, master_sha256: str
) -> dict[str, str]:
    """The master's metadata, and what makes this object a rendition of it."""
    return {
        **image_metadata(image),
        "sha256": rendition.sha256,
        "size": placement.size,
        "width": str(rendition.width),
        "height": str(rendition.height),
        "placement": placement.name,
        "master-sha256": master_sha256,
        "cropped": f"{rendition.cropped:.4f}",
    }


def _record(
    image: GeneratedImage, bucket_name: str, key: str, placement: Placement, rendition: Rendition
) -> StoredImage:
    return StoredImage.of(image, bucket_name, key).model_copy(
        update={
            "uri": s3_uri(bucket_name, key),
            "sha256": rendition.sha256,
            "size": len(rendition.data),
            "media_type": rendition.media_type,
            "width": rendition.width,
            "height": rendition.height,
            "cost_usd": 0.0,
            "placement": placement.name,
            "cropped": round(rendition.cropped, 4),
        }
    )
