"""The upload task: one image into an S3-compatible bucket."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import task_run
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect_aws import S3Bucket

from prefect_gpt_image._object_keys import slugify
from prefect_gpt_image._retry_policy import UPLOAD_TASK_RETRIES
from prefect_gpt_image._storage import store_image
from prefect_gpt_image.models import GeneratedImage, ImageRequest, StoredImage


def _run_name() -> str:
    image = task_run.parameters.get("image")
    label = image.request.label if isinstance(image, GeneratedImage) else ""
    return f"upload-{slugify(label, max_chars=40)}"


_TASK_OPTIONS: dict[str, Any] = dict(
    name="upload-image",
    task_run_name=_run_name,
    **UPLOAD_TASK_RETRIES,
    # An upload is checked against the bucket (HEAD), never a cache: the object may be gone.
    # Without a cache policy, Prefect does not hash the image to make a key it would not use.
    cache_policy=NO_CACHE,
    persist_result=False,
)


@task(**_TASK_OPTIONS)
async def aupload_image(
    image: GeneratedImage,
    bucket: S3Bucket,
    prefix: str = "",
    request: ImageRequest | None = None,
) -> StoredImage:
    """`upload_image` for async flows: the same upload and retries, awaited.

    Args:
        image: What `agenerate_image` returned.
        bucket: A prefect-aws `S3Bucket` block, for any S3-compatible storage.
        prefix: The folder, within the bucket folder.
        request: The request to store the image for, as for `upload_image`.

    Returns:
        The stored image's record, as `upload_image` returns it.

    Example:
        ```python
        from prefect import flow
        from prefect_aws import S3Bucket
        from prefect_gpt_image import agenerate_image, aupload_image

        @flow
        async def hero_image():
            image = await agenerate_image("a mug on an oak table")
            return await aupload_image(image, S3Bucket.load("BLOCK_NAME"), prefix="heroes")
        ```
    """
    return await run_sync_in_worker_thread(_upload, image, bucket, prefix, request)


@task(**_TASK_OPTIONS)
def upload_image(
    image: GeneratedImage,
    bucket: S3Bucket,
    prefix: str = "",
    request: ImageRequest | None = None,
) -> StoredImage:
    """Store an image at `{bucket_folder}/{prefix}/{slug}-{sha256[:12]}.{ext}`.

    Args:
        image: What `generate_image` returned.
        bucket: A prefect-aws `S3Bucket` block, for any S3-compatible storage.
        prefix: The folder, within the bucket folder.
        request: The request to store the image for, when it is not the one the image
            was generated for: a cached image serves every request with the same
            prompt, size and extras, whatever its `name`.

    Sets Content-Type and user metadata (prompt, name, model, route, size, sha256). The
    key is content-addressed, so uploading the same image again writes nothing new. With
    `n` above one, every image of the call is stored; the others' records are in the
    result's `more_images`.
    Throttling and outages are retried; a missing bucket or refused credentials
    fail at once with an error that says which.

    Returns:
        The stored image's record: bucket, key, `s3://` URI, size, SHA-256 and cost.

    Example:
        Generate an image and store it in a saved bucket block:
        ```python
        from prefect import flow
        from prefect_aws import S3Bucket
        from prefect_gpt_image import generate_image, upload_image

        @flow
        def hero_image():
            image = generate_image("a mug on an oak table", credentials="gpt-image-credentials")
            return upload_image(image, S3Bucket.load("BLOCK_NAME"), prefix="heroes")
        ```
    """
    return _upload(image, bucket, prefix, request)


def _upload(
    image: GeneratedImage, bucket: S3Bucket, prefix: str, request: ImageRequest | None
) -> StoredImage:
    first, *others = image.variants()
    stored, written = store_image(first, bucket, prefix, request)
    get_run_logger().info("%s %s", "Stored" if written else "Already stored", stored.uri)
    if others:  # every image of an n above one is paid for: none is left behind
        more = [store_image(other, bucket, prefix, request)[0] for other in others]
        stored = stored.model_copy(update={"more_images": more})
    return stored
