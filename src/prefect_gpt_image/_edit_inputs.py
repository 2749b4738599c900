"""The images given to an edit: checked before anything is paid, read again when sent.

Checking reads each image once, decodes it in full and keeps only its record (where it
is, its SHA-256, type and size), so that a run over hundreds of large photos does not
hold them all in memory. When its request is sent the image is read again, and refused
if its bytes are no longer those checked: the cache key names what was sent.

An `s3://` image in the `S3Bucket` block's own bucket is read through that block; one in
any other bucket with the environment's AWS credentials.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from PIL import Image

from prefect_gpt_image._images import MEDIA_TYPES, inspect_image
from prefect_gpt_image._object_keys import s3_uri, split_s3_uri
from prefect_gpt_image._storage import (
    CLIENT_CONFIG,
    CREDENTIAL_ERRORS,
    error_code,
    s3_client,
    storage_error,
)
from prefect_gpt_image.errors import InvalidImageError, InvalidRequestError
from prefect_gpt_image.models import InputImage, StoredImage

if TYPE_CHECKING:
    from prefect_aws import S3Bucket

InputRef = str | Path | bytes | StoredImage | InputImage
"""What may be given as an input image: a local path, an `s3://bucket/key` URI, bytes,
an image stored by an earlier run, or an image already checked."""

MAX_INPUT_BYTES = 50_000_000
"""The API takes input images under 50 MB; read as decimal megabytes, the stricter."""
MAX_MASK_BYTES = 4_000_000
"""The API takes masks under 4 MB."""
MAX_INPUT_PIXELS = 50_000_000
"""The most pixels an input image may have: a 50-megapixel camera frame, where generated
images stop at 12.4. Decoding takes up to 4 bytes a pixel, so this bounds what checking
one image costs (about 200 MB)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""The files a folder of input images is taken to hold."""

_BYTES_URI = "bytes:"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_environment_s3: Any = None
_environment_lock = threading.Lock()


class _TooLarge(Exception):
    """Bytes past the cap, found before they were all read."""

    def __init__(self, size: str) -> None:
        super().__init__(size)
        self.size = size


def check_input(
    ref: InputRef, *, bucket: S3Bucket | None = None, base_dir: Path | None = None
) -> InputImage:
    """The record of an input image, read once and decoded in full, or
    InvalidRequestError saying what is wrong with it; an `InputImage` is returned as is.

    Relative paths are read from `base_dir` (the working directory if None); `bucket`
    reads `s3://` URIs in its own bucket.
    """
    if isinstance(ref, InputImage):
        return ref
    image, _ = _load(ref, "input image", MAX_INPUT_BYTES, bucket, base_dir)
    return image


def check_mask(
    ref: InputRef,
    first: InputImage,
    *,
    bucket: S3Bucket | None = None,
    base_dir: Path | None = None,
) -> InputImage:
    """The record of a mask: a PNG under 4 MB, with an alpha channel, the size of `first`
    (the image it masks); else InvalidRequestError saying which it is not."""
    if isinstance(ref, InputImage):
        mask, where = ref, _where("mask", ref.uri)
        if mask.size >= MAX_MASK_BYTES:
            raise _too_large(where, f"{mask.size:,} bytes", MAX_MASK_BYTES)
        data = read_input(mask, bucket=bucket)
    else:
        mask, data = _load(ref, "mask", MAX_MASK_BYTES, bucket, base_dir)
        where = _where("mask", mask.uri)
    if mask.media_type != MEDIA_TYPES["PNG"]:
        raise InvalidRequestError(
            f"The {where} is {mask.media_type}; a mask must be a PNG with an alpha channel, "
            "its transparent pixels marking the area to edit."
        )
    if not _has_alpha(data):
        raise InvalidRequestError(
            f"The {where} has no alpha channel; save it as a PNG with transparency (RGBA), "
            "its transparent pixels marking the area to edit."
        )
    if (mask.width, mask.height) != (first.width, first.height):
        raise InvalidRequestError(
            f"The {where} is {mask.width}x{mask.height} pixels, and the first input image "
            f"({_shown(first.uri)}) is {first.width}x{first.height}: a mask must be the size "
            "of the first image."
        )
    return mask


def read_input(image: InputImage, *, bucket: S3Bucket | None = None) -> bytes:
    """The bytes of a checked image, read when its request is sent; InvalidRequestError if
    they are no longer the bytes checked, so that the cache key names what is sent."""
    where = _where("input image", image.uri)
    try:
        if image.data is not None:
            data = image.data
        elif image.uri.startswith("s3://"):
            bucket_name, key = split_s3_uri(image.uri)
            data = _read_s3(bucket_name, key, where, image.size + 1, bucket)
        else:
            data = _read_file(_file_path(image.uri), where, image.size + 1)
    except _TooLarge as exc:
        raise _changed(where, f"it is now {exc.size}, not {image.size:,} bytes") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != image.sha256:
        raise _changed(where, f"its SHA-256 is now {digest[:12]}, not {image.sha256[:12]}")
    return data


def expand_inputs(
    source: InputRef | Sequence[InputRef],
    *,
    bucket: S3Bucket | None = None,
    base_dir: Path | None = None,
) -> list[InputRef]:
    """The input images `source` names: a list of them, a folder (an `s3://bucket/prefix/`
    ending in a slash, or a local directory) whose image files are taken in name order,
    or one image."""
    if isinstance(source, str) and source.startswith("s3://") and source.endswith("/"):
        refs: list[InputRef] = list(_s3_folder(source, bucket))
        if not refs:
            raise InvalidRequestError(
                f"{source} holds no PNG, JPEG or WebP images ({', '.join(IMAGE_SUFFIXES)}): "
                "check the bucket and prefix."
            )
        return refs
    if isinstance(source, Path) or (isinstance(source, str) and not _SCHEME.match(source)):
        path = _resolved(source, base_dir)
        if not path.is_dir():
            return [path]
        refs = list(_local_folder(path))
        if not refs:
            raise InvalidRequestError(
                f"The folder {path} holds no PNG, JPEG or WebP images "
                f"({', '.join(IMAGE_SUFFIXES)}): check the path."
            )
        return refs
    if isinstance(source, str | bytes | StoredImage | InputImage):
        return [source]
    if not source:
        raise InvalidRequestError("No input images were given: give at least one to edit.")
    return list(source)


# --- Reading, once and checked ------------------------------------------------------------


def _load(
    ref: InputRef, what: str, max_bytes: int, bucket: S3Bucket | None, base_dir: Path | None
) -> tuple[InputImage, bytes]:
    """The record of an image and its bytes, checked; the record keeps the bytes only for
    an image given as bytes."""
    if isinstance(ref, bytes):
        uri = _BYTES_URI
    elif isinstance(ref, StoredImage):
        uri = s3_uri(ref.bucket, ref.key)
    elif isinstance(ref, str) and ref.startswith("s3://"):
        uri = ref
    elif isinstance(ref, str) and ref.startswith("file://"):
        uri = _file_path(ref).resolve().as_uri()
    elif isinstance(ref, str) and _SCHEME.match(ref):
        raise InvalidRequestError(
            f"The {what} {ref} cannot be read: give a local path or an s3:// URI."
        )
    elif isinstance(ref, str | Path):
        uri = _resolved(ref, base_dir).as_uri()
    else:
        raise InvalidRequestError(
            f"An {what} cannot be a {type(ref).__name__}: give a path, an s3:// URI, "
            "bytes or a StoredImage."
        )
    where = _where(what, uri)
    try:
        if isinstance(ref, bytes):
            if len(ref) >= max_bytes:
                raise _TooLarge(f"{len(ref):,} bytes")
            data = ref
        elif uri.startswith("s3://"):
            data = _read_s3(*split_s3_uri(uri), where, max_bytes, bucket)
        else:
            data = _read_file(_file_path(uri), where, max_bytes)
    except _TooLarge as exc:
        raise _too_large(where, exc.size, max_bytes) from None
    sha256 = hashlib.sha256(data).hexdigest()
    if isinstance(ref, StoredImage) and sha256 != ref.sha256:
        raise InvalidRequestError(
            f"The {where} is not the image stored there: its SHA-256 is {sha256[:12]}, "
            f"not {ref.sha256[:12]}. Something overwrote it: to edit what is there now, "
            "give its URI instead."
        )
    try:
        info = inspect_image(data, source=f"The {where} is", max_pixels=MAX_INPUT_PIXELS)
    except InvalidImageError as exc:
        raise InvalidRequestError(str(exc)) from None
    image = InputImage(
        uri=uri,
        sha256=sha256,
        media_type=info.media_type,
        size=len(data),
        width=info.width,
        height=info.height,
        data=data if uri == _BYTES_URI else None,
    )
    return image, data


def _read_file(path: Path, where: str, max_bytes: int) -> bytes:
    """A file's bytes, weighed before they are read."""
    try:
        with path.open("rb") as file:
            return _read_capped(file, os.fstat(file.fileno()).st_size, max_bytes)
    except FileNotFoundError:
        raise InvalidRequestError(f"The {where} does not exist: check the path.") from None
    except IsADirectoryError:
        raise InvalidRequestError(f"The {where} is a folder, not an image file.") from None
    except OSError as exc:
        raise InvalidRequestError(
            f"Cannot read the {where}: {exc.strerror or type(exc).__name__}."
        ) from None


def _read_s3(
    bucket_name: str, key: str, where: str, max_bytes: int, bucket: S3Bucket | None
) -> bytes:
    """An object's bytes, weighed before they are read: through `bucket` if it is the
    object's bucket, else with the environment's AWS credentials."""
    own = bucket is not None and bucket.bucket_name == bucket_name
    try:
        client = s3_client(bucket) if bucket is not None and own else _environment_client()
        answer = client.get_object(Bucket=bucket_name, Key=key)
        body = answer["Body"]
        try:
            return _read_capped(body, int(answer["ContentLength"]), max_bytes)
        finally:
            body.close()
    except NoCredentialsError:
        raise _no_credentials(f"read the {where}") from None
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(exc, bucket_name, f"read the {where}", own) from None


def _read_capped(file: Any, size: int, max_bytes: int) -> bytes:
    """At most `max_bytes` of a file of `size` bytes: one too large is refused unread, and
    one that grows while it is read stops being read at the cap."""
    if size >= max_bytes:
        raise _TooLarge(f"{size:,} bytes")
    data = bytes(file.read(max_bytes))
    if len(data) >= max_bytes:
        raise _TooLarge(f"{max_bytes:,} bytes or more")
    return data


def _environment_client() -> Any:
    """The process-wide boto3 client for buckets other than the block's: the
    environment's credentials, region and endpoint (AWS_ENDPOINT_URL)."""
    global _environment_s3
    with _environment_lock:
        if _environment_s3 is None:
            import boto3

            _environment_s3 = boto3.session.Session().client("s3", config=CLIENT_CONFIG)
        return _environment_s3


def _has_alpha(data: bytes) -> bool:
    """Whether a decoded PNG has an alpha channel: a transparent palette entry is not one."""
    with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
        return "A" in image.getbands()


# --- Folders --------------------------------------------------------------------------------


def _s3_folder(uri: str, bucket: S3Bucket | None) -> list[str]:
    """The URIs of the image objects directly in an `s3://bucket/prefix/` folder, by key."""
    bucket_name, prefix = split_s3_uri(uri)
    own = bucket is not None and bucket.bucket_name == bucket_name
    keys: list[str] = []
    try:
        client = s3_client(bucket) if bucket is not None and own else _environment_client()
        pages = client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=bucket_name, Prefix=prefix, Delimiter="/"):
            keys.extend(item["Key"] for item in page.get("Contents", ()))
    except NoCredentialsError:
        raise _no_credentials(f"list {uri}") from None
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(exc, bucket_name, f"list {uri}", own) from None
    return [s3_uri(bucket_name, key) for key in sorted(keys) if _is_image_name(key)]


def _local_folder(path: Path) -> list[Path]:
    """The image files directly in a folder, by name."""
    try:
        entries = sorted(path.iterdir())
    except OSError as exc:
        raise InvalidRequestError(
            f"Cannot list the folder {path}: {exc.strerror or type(exc).__name__}."
        ) from None
    return [entry for entry in entries if _is_image_name(entry.name) and entry.is_file()]


def _is_image_name(key: str) -> bool:
    """An image file's name; hidden files (macOS's `._photo.jpg`) are not images."""
    name = key.rsplit("/", 1)[-1]
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


# --- Names and errors -----------------------------------------------------------------------


def _resolved(path: str | Path, base_dir: Path | None) -> Path:
    path = Path(path).expanduser()
    return (base_dir / path if base_dir is not None else path).resolve()


def _file_path(uri: str) -> Path:
    return Path(url2pathname(urlsplit(uri).path))


def _where(what: str, uri: str) -> str:
    """How messages name an image: "input image /photos/mug.jpg"."""
    return f"{what} given as bytes" if uri == _BYTES_URI else f"{what} {_shown(uri)}"


def _shown(uri: str) -> str:
    return str(_file_path(uri)) if uri.startswith("file:") else uri


def _too_large(where: str, size: str, max_bytes: int) -> InvalidRequestError:
    kind = "a mask" if where.startswith("mask") else "an input image"
    return InvalidRequestError(
        f"The {where} is {size}; {kind} must be under {max_bytes:,} bytes "
        f"({max_bytes // 1_000_000} MB): resize or recompress it."
    )


def _changed(where: str, how: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"The {where} changed since it was checked: {how}. Leave input images as they are "
        "until the run ends, or run again to check the new ones."
    )


def _no_credentials(action: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Cannot {action}: it is not in the S3Bucket block's bucket, so it is read with the "
        "environment's AWS credentials, and there are none. Set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or copy it into the block's bucket."
    )


def _s3_error(exc: Exception, bucket_name: str, action: str, own: bool) -> Exception:
    """A missing object, a name S3 refuses or a refusal of the credentials is the input's
    fault, and fails its rows alone; a transient failure stays a retryable StorageError.
    A bucket not the block's is read with the environment's credentials, and its messages
    say so."""
    error = storage_error(exc, bucket_name, action)
    if error.retryable or own:
        return error if error.retryable else InvalidRequestError(str(error))
    code = error_code(exc) if isinstance(exc, ClientError) else ""
    where = f"bucket {bucket_name!r}"
    if code == "NoSuchBucket":
        return InvalidRequestError(
            f"Could not {action}: {where} does not exist at the environment's S3 endpoint. "
            "Check the bucket's name, or AWS_ENDPOINT_URL."
        )
    if code not in CREDENTIAL_ERRORS:  # a missing object, a name S3 refuses
        return InvalidRequestError(str(error))
    return InvalidRequestError(
        f"Could not {action}: S3 refused the environment's AWS credentials for {where} "
        f"({code}). It is not the S3Bucket block's bucket, so it is read with "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE): set ones that may "
        "read it, or copy it into the block's bucket."
    )
