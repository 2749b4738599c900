"""The upload task: one image into an S3-compatible bucket."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import task_run
from prefect_aws import S3Bucket

from prefect_gpt_image.models import GeneratedImage, ImageRequest, StoredImage
from prefect_gpt_image.object_keys import check_bucket_name, image_key, slugify
from prefect_gpt_image.retry_policy import (
    RETRY_JITTER_FACTOR,
    UPLOAD_RETRIES,
    UPLOAD_RETRY_DELAYS,
    retry_condition,
)
from prefect_gpt_image.storage import put_image


def _run_name() -> str:
    image = task_run.parameters.get("image")
    label = (
        (image.request.name or image.request.prompt) if isinstance(image, GeneratedImage) else ""
    )
    return f"upload-{slugify(label, max_chars=40)}"


@task(
    name="upload-image",
    task_run_name=_run_name,
    retries=UPLOAD_RETRIES,
    retry_delay_seconds=UPLOAD_RETRY_DELAYS,
    retry_jitter_factor=RETRY_JITTER_FACTOR,
    retry_condition_fn=retry_condition,
    # An upload is checked against the bucket (HEAD), never a cache: the object may be gone.
    # Without a cache policy, Prefect does not hash the image to make a key it would not use.
    cache_policy=NO_CACHE,
    persist_result=False,
)
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
    """
    first, *others = image.variants()
    stored, written = store_image(first, bucket, prefix, request)
    get_run_logger().info("%s %s", "Stored" if written else "Already stored", stored.uri)
    if others:  # every image of an n above one is paid for: none is left behind
        more = [store_image(other, bucket, prefix, request)[0] for other in others]
        stored = stored.model_copy(update={"more_images": more})
    return stored


def store_image(
    image: GeneratedImage,
    bucket: S3Bucket,
    prefix: str = "",
    request: ImageRequest | None = None,
    *,
    check_existing: bool = True,
) -> tuple[StoredImage, bool]:
    """`upload_image` without a task run, for a flow that keeps its own records; also
    returns whether anything was written. `check_existing=False` skips the HEAD, for an
    image just generated."""
    check_bucket_name(bucket.bucket_name)
    if request is not None:
        image = image.model_copy(update={"request": request})
    key = image_key(bucket.bucket_folder, prefix, image)
    written = put_image(bucket, key, image, check_existing=check_existing)
    return StoredImage.of(image, bucket.bucket_name, key), written
