"""S3 access through a prefect-aws `S3Bucket` block, with one shared client per credentials.

A boto3 client costs about 300 ms of CPU to build, and prefect-aws's own uses
botocore's defaults (legacy retries, 10 connections), so this module builds one
per credentials with standard retries and a pool sized for concurrent uploads,
and every upload task in the process shares it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from prefect_gpt_image._object_keys import check_bucket_name, image_key, s3_uri
from prefect_gpt_image._retry_policy import S3_ATTEMPTS_PER_REQUEST
from prefect_gpt_image.errors import StorageError
from prefect_gpt_image.models import GeneratedImage, ImageRequest, StoredImage

if TYPE_CHECKING:
    from prefect_aws import S3Bucket

CLIENT_CONFIG = Config(
    signature_version="s3v4",
    retries={"mode": "standard", "max_attempts": S3_ATTEMPTS_PER_REQUEST},
    connect_timeout=10,
    read_timeout=60,
    max_pool_connections=64,
)
logger = logging.getLogger(__name__)

METADATA_PROMPT_BYTES = 1024
"""S3 allows 2 KB of user metadata in all; the prompt gets at most this much of it."""

_clients: dict[int, Any] = {}
_clients_by_object: dict[int, tuple[Any, Any]] = {}
"""The same clients by the credentials object's identity, for the objects seen last: hashing
the block's fields on every request costs more than signing it. A block is not changed in
place once used; a changed copy is another object."""
_KNOWN_OBJECTS = 64
_clients_lock = threading.Lock()

CREDENTIAL_ERRORS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "403",
}
"""S3 error codes that say the credentials may not do this."""
_TRANSIENT_ERRORS = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "RequestTimeout",
    "OperationAborted",
}
"""S3 error codes that a later attempt may not meet. Any other code (InvalidArgument for a
name the server refuses, say) is the request's own fault, and fails at once."""


def s3_client(bucket: S3Bucket) -> Any:
    """The process-wide boto3 client for this bucket's credentials."""
    credentials = bucket.credentials
    known = _clients_by_object.get(id(credentials))
    if known is not None and known[0] is credentials:
        return known[1]
    cache_key = hash(credentials)
    with _clients_lock:
        if (client := _clients.get(cache_key)) is None:
            params = credentials.aws_client_parameters.get_params_override()
            user_config = params.pop("config", None)
            # The block's own botocore settings win over these defaults.
            config = CLIENT_CONFIG.merge(user_config) if user_config else CLIENT_CONFIG
            client = credentials.get_boto3_session().client(
                "s3", region_name=credentials.region_name, config=config, **params
            )
            _clients[cache_key] = client
        if len(_clients_by_object) >= _KNOWN_OBJECTS:
            _clients_by_object.clear()
        _clients_by_object[id(credentials)] = (credentials, client)
        return client


def object_uri(bucket: S3Bucket, key: str) -> str:
    return s3_uri(bucket.bucket_name, key)


def object_link(bucket: S3Bucket, key: str, *, public_base_url: str | None, expires_in: int) -> str:
    """A URL a person can open: under the public base URL, else presigned."""
    if public_base_url:
        return f"{public_base_url.rstrip('/')}/{quote(key)}"
    return str(
        s3_client(bucket).generate_presigned_url(
            "get_object", Params={"Bucket": bucket.bucket_name, "Key": key}, ExpiresIn=expires_in
        )
    )


def put_image(
    bucket: S3Bucket, key: str, image: GeneratedImage, *, check_existing: bool = True
) -> bool:
    """Store an image unless the same bytes are there already; True if it was written.

    `check_existing=False` skips that check (a HEAD), for an image just generated: its key
    holds its SHA-256, so it cannot be there yet.
    """
    if check_existing and _stored_size(bucket, key) == len(image.data):
        return False
    put_bytes(bucket, key, image.data, image.media_type, metadata=image_metadata(image))
    return True


def _stored_size(bucket: S3Bucket, key: str) -> int | None:
    existing = stored_object(bucket, key)
    return None if existing is None else existing.size


@dataclass(frozen=True)
class StoredObject:
    """What a HEAD tells of an object; its metadata's names in lower case, as S3 keeps
    them (some S3-compatible servers title-case them)."""

    size: int
    content_type: str
    metadata: dict[str, str]


def stored_object(bucket: S3Bucket, key: str) -> StoredObject | None:
    """The object at `key`, or None if there is none (or HEAD is forbidden)."""
    try:
        existing = s3_client(bucket).head_object(Bucket=bucket.bucket_name, Key=key)
    except ClientError as exc:
        # 403: a write-only policy may forbid HEAD; the PUT will tell.
        if error_code(exc) in ("404", "NoSuchKey", "NotFound", "403"):
            return None
        raise storage_error(exc, bucket.bucket_name, "check") from None
    except BotoCoreError as exc:
        raise storage_error(exc, bucket.bucket_name, "check") from None
    return StoredObject(
        size=int(existing["ContentLength"]),
        content_type=str(existing.get("ContentType", "")),
        metadata={name.lower(): value for name, value in existing.get("Metadata", {}).items()},
    )


def put_bytes(
    bucket: S3Bucket,
    key: str,
    data: bytes,
    content_type: str,
    metadata: dict[str, str] | None = None,
) -> None:
    try:
        s3_client(bucket).put_object(
            Bucket=bucket.bucket_name,
            Key=key,
            Body=data,
            ContentType=content_type,
            Metadata=metadata or {},
        )
    except (ClientError, BotoCoreError) as exc:
        raise storage_error(exc, bucket.bucket_name, "write") from None


def copy_object(bucket: S3Bucket, source_key: str, key: str) -> None:
    """Copy `source_key` to `key` within the bucket, server-side: the bytes never leave S3,
    and the object keeps its type and metadata."""
    source = {"Bucket": bucket.bucket_name, "Key": source_key}
    try:
        s3_client(bucket).copy_object(Bucket=bucket.bucket_name, Key=key, CopySource=source)
    except (ClientError, BotoCoreError) as exc:
        raise storage_error(exc, bucket.bucket_name, f"copy {source_key}") from None


WRITE_CHECK_NAME = ".prefect-gpt-image-write-check"
"""The empty object written, then deleted, to prove a bucket takes writes before paying."""


def check_writable(bucket: S3Bucket, folder: str) -> None:
    """Prove, before anything is paid for, that `folder` exists, takes these credentials and
    can be written: a missing bucket or a wrong secret is found now, not after the images."""
    key = f"{folder}/{WRITE_CHECK_NAME}" if folder else WRITE_CHECK_NAME
    put_bytes(bucket, key, b"", "application/octet-stream")
    try:
        s3_client(bucket).delete_object(Bucket=bucket.bucket_name, Key=key)
    except (ClientError, BotoCoreError) as exc:  # written is what matters; say what is left
        logger.warning("Could not delete the write check %s: %s", object_uri(bucket, key), exc)


def object_sizes(bucket: S3Bucket, prefix: str) -> dict[str, int]:
    """Every object under `prefix`, with its size: one listing instead of a HEAD per image."""
    sizes: dict[str, int] = {}
    try:
        pages = s3_client(bucket).get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=bucket.bucket_name, Prefix=prefix):
            sizes.update((item["Key"], item["Size"]) for item in page.get("Contents", ()))
    except (ClientError, BotoCoreError) as exc:
        raise storage_error(exc, bucket.bucket_name, "list") from None
    return sizes


def read_uri(bucket: S3Bucket, uri: str) -> bytes:
    """Read `s3://bucket/key` with this block's credentials and endpoint."""
    parts = urlsplit(uri)
    try:
        answer = s3_client(bucket).get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))
        return bytes(answer["Body"].read())
    except (ClientError, BotoCoreError) as exc:
        raise storage_error(exc, parts.netloc, f"read {uri}") from None


def image_metadata(image: GeneratedImage) -> dict[str, str]:
    """User metadata, which S3 keeps ASCII-only: text fields are percent-encoded UTF-8."""
    request = image.request
    metadata = {
        "prompt": _ascii_truncated(request.prompt, METADATA_PROMPT_BYTES),
        "model": quote(image.model, safe=" "),
        "route": quote(image.route, safe=" :"),
        "size": f"{image.width}x{image.height}",
        "sha256": image.sha256,
    }
    if request.name:
        metadata["name"] = _ascii_truncated(request.name, 256)
    return metadata


def _ascii_truncated(text: str, limit: int) -> str:
    encoded = quote(text, safe=" ,.:;!?'()/-_")
    if len(encoded) <= limit:
        return encoded
    cut = encoded[:limit]
    # Never split a %XX escape.
    return cut[: cut.rfind("%")] if "%" in cut[-2:] else cut


def storage_error(exc: Exception, bucket_name: str, action: str) -> StorageError:
    """A clear, correctly classified error from a boto3 failure."""
    code = error_code(exc) if isinstance(exc, ClientError) else ""
    where = f"bucket {bucket_name!r}"
    if code in ("NoSuchKey", "404"):
        return StorageError(f"Could not {action}: no such object in {where}.", retryable=False)
    if code == "NoSuchBucket":
        return StorageError(
            f"Could not {action}: {where} does not exist at this endpoint. Create it, or "
            "fix bucket_name in the S3Bucket block.",
            retryable=False,
        )
    if code in CREDENTIAL_ERRORS:
        return StorageError(
            f"Could not {action}: S3 refused the credentials for {where} ({code}). Check "
            "the AwsCredentials block's access key, secret and endpoint.",
            retryable=False,
        )
    if isinstance(exc, ClientError) and not _transient(exc):
        message = exc.response.get("Error", {}).get("Message", "")
        return StorageError(
            f"Could not {action}: {where} refused it ({code or 'no code'}: {message}).",
            retryable=False,
        )
    return StorageError(
        f"Could not {action} in {where}: {type(exc).__name__}: {exc}", retryable=_transient(exc)
    )


def _transient(exc: Exception) -> bool:
    """Whether S3's failure may pass: a code or status that says so (throttling, 5xx), or
    no answer at all. A name the client itself refuses never passes."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error_code(exc) in _TRANSIENT_ERRORS or status == 429 or status >= 500
    return not isinstance(exc, ParamValidationError)


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def store_image(
    image: GeneratedImage,
    bucket: S3Bucket,
    prefix: str = "",
    request: ImageRequest | None = None,
    *,
    check_existing: bool = True,
) -> tuple[StoredImage, bool]:
    """The upload itself, which `upload_image` runs as a task; also returns whether
    anything was written. `check_existing=False` skips the HEAD, for an image just
    generated.

    The flow calls it without a task run, with the same retry policy
    (`_retry_policy.call_with_retries`): a task run costs more CPU than the upload, and
    the generation's task run already stands for the image.
    """
    check_bucket_name(bucket.bucket_name)
    if request is not None:
        image = image.model_copy(update={"request": request})
    record = planned_record(image, bucket, prefix)
    written = put_image(bucket, record.key, image, check_existing=check_existing)
    return record, written


def planned_record(
    image: GeneratedImage, bucket: S3Bucket, prefix: str = "", request: ImageRequest | None = None
) -> StoredImage:
    """The record of `image` once stored in `bucket`, under the key `object_keys` gives
    it, for `request` (default: the request it was generated for)."""
    if request is not None:
        image = image.model_copy(update={"request": request})
    return StoredImage.of(image, bucket.bucket_name, image_key(bucket.bucket_folder, prefix, image))
