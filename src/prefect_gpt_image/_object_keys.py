"""Object keys, in one place: `{bucket_folder}/{prefix}/{slug}-{sha256[:12]}.{ext}` for an
image as the API made it, and `{slug}-{placement}-{WIDTHxHEIGHT}-{recipe[:12]}.{ext}` beside
it for each of its renditions.

Readable (the slug comes from the name or the prompt), content-addressed (the
same bytes always land on the same key, so re-uploads are idempotent) and safe:
whatever a prompt or name says, a key never escapes its prefix. A rendition's key is
addressed by its recipe (its master's SHA-256, the placement and how it was adapted),
which is known before anything is drawn: a re-run finds it without rendering it again.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from prefect_gpt_image.errors import InvalidRequestError

if TYPE_CHECKING:
    from prefect_gpt_image.models import GeneratedImage, ImageRequest

SLUG_MAX_CHARS = 48
HASH_CHARS = 12

_NOT_SLUG = re.compile(r"[^a-z0-9]+")
# Latin letters that Unicode does not decompose into a base letter and an accent.
_LATIN_LETTERS = str.maketrans(
    {
        "ß": "ss",
        "æ": "ae",
        "Æ": "AE",
        "œ": "oe",
        "Œ": "OE",
        "ø": "o",
        "Ø": "O",
        "ł": "l",
        "Ł": "L",
        "đ": "d",
        "Đ": "D",
        "þ": "th",
        "Þ": "TH",
        "ð": "d",
        "Ð": "D",
    }
)
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9_.=+@-]+")


def slugify(text: str, max_chars: int = SLUG_MAX_CHARS) -> str:
    """Lower-case ASCII words joined by hyphens; "image" when nothing is left."""
    folded = unicodedata.normalize("NFKD", text.translate(_LATIN_LETTERS))
    ascii_text = folded.encode("ascii", "ignore").decode()
    slug = _NOT_SLUG.sub("-", ascii_text.lower()).strip("-")
    if len(slug) > max_chars:
        cut = slug[:max_chars]
        slug = cut.rsplit("-", 1)[0] if "-" in cut else cut
    return slug or "image"


def normalize_prefix(prefix: str) -> str:
    """A prefix as "a/b/c", or InvalidRequestError if it is not a safe S3 folder."""
    segments = [s for s in prefix.strip().strip("/").split("/")]
    if segments == [""]:
        return ""
    for segment in segments:
        if segment in ("", ".", "..") or not _PREFIX_SEGMENT.fullmatch(segment):
            raise InvalidRequestError(
                f"The prefix {prefix!r} is not a safe S3 folder: use letters, digits and "
                "_ . = + @ - in segments separated by single slashes, with no '.' or '..'."
            )
    return "/".join(segments)


_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+")


def check_bucket_name(name: str) -> None:
    """Refuse a bucket name S3 would refuse, before anything is paid for."""
    if (
        not _BUCKET_NAME.fullmatch(name)
        or ".." in name
        or ".-" in name
        or "-." in name
        or _IP_ADDRESS.fullmatch(name)
    ):
        raise InvalidRequestError(
            f"{name!r} is not a valid S3 bucket name: 3 to 63 lower-case letters, digits, "
            "dots and hyphens, starting and ending with a letter or digit."
        )


def s3_uri(bucket_name: str, key: str) -> str:
    """`s3://bucket/key`: how the manifest, the report and prompt files name an object."""
    return f"s3://{bucket_name}/{key}"


def split_s3_uri(uri: str) -> tuple[str, str]:
    """The bucket and key of `s3://bucket/key`, split by hand: a key may hold `?` and `#`,
    which a URL parser would take for a query and a fragment."""
    bucket_name, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket_name:
        raise InvalidRequestError(f"{uri!r} names no bucket: expected s3://bucket/key.")
    return bucket_name, key


def join_key(*parts: str) -> str:
    """Join folder parts and a file name, skipping empty parts."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def image_key(bucket_folder: str, prefix: str, image: GeneratedImage) -> str:
    """Where an image is stored."""
    filename = f"{_slug(image.request)}-{image.sha256[:HASH_CHARS]}.{image.extension}"
    return join_key(bucket_folder, normalize_prefix(prefix), filename)


def rendition_key(
    bucket_folder: str,
    prefix: str,
    request: ImageRequest,
    placement: str,
    size: str,
    recipe_sha256: str,
    extension: str,
) -> str:
    """Where a rendition of `request`'s master is stored, beside it: the concept, the
    placement and its pixels, then the start of its recipe's SHA-256."""
    name = slugify(placement, max_chars=PLACEMENT_SLUG_MAX_CHARS)
    filename = f"{_slug(request)}-{name}-{size}-{recipe_sha256[:HASH_CHARS]}.{extension}"
    return join_key(bucket_folder, normalize_prefix(prefix), filename)


def _slug(request: ImageRequest) -> str:
    """An image's name in its key: an edit's first input, then the request's title."""
    first = request.inputs[0].name + " " if request.is_edit and request.inputs else ""
    return slugify(first + request.title)


PLACEMENT_SLUG_MAX_CHARS = 40
MAX_KEY_BYTES = 1024
"""S3's limit on an object key, in UTF-8 bytes."""
_LONGEST_IMAGE_NAME = (
    SLUG_MAX_CHARS + PLACEMENT_SLUG_MAX_CHARS + len("-9999x9999-") + 1 + HASH_CHARS + len(".webp")
)
_LONGEST_MANIFEST_NAME = len("manifest-") + 80 + len(".jsonl")


def check_key_room(bucket_folder: str, prefix: str) -> None:
    """Refuse, before anything is paid for, a folder whose longest key would pass S3's limit."""
    folder = join_key(bucket_folder, normalize_prefix(prefix))
    longest = len(folder.encode()) + 1 + max(_LONGEST_IMAGE_NAME, _LONGEST_MANIFEST_NAME)
    if longest > MAX_KEY_BYTES:
        raise InvalidRequestError(
            f"Keys under {folder[:60]!r}... could reach {longest} bytes, over S3's "
            f"{MAX_KEY_BYTES}: shorten the bucket folder or the prefix."
        )


def manifest_key(bucket_folder: str, prefix: str, run_label: str) -> str:
    """Where a run's manifest is stored: beside its images."""
    filename = f"manifest-{slugify(run_label, max_chars=80)}.jsonl"
    return join_key(bucket_folder, normalize_prefix(prefix), filename)
