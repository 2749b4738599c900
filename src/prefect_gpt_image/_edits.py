"""Edit requests: their inputs checked before anything is paid, and read when sent."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from prefect_gpt_image._edit_inputs import check_input, check_mask, read_input
from prefect_gpt_image.errors import InvalidRequestError
from prefect_gpt_image.models import ImageRequest, InputImage

if TYPE_CHECKING:
    from prefect_aws import S3Bucket

InputFile = tuple[str, bytes, str]
"""A file as the `openai` package sends it: name, bytes, media type."""


def checked_edit(
    request: ImageRequest,
    *,
    bucket: S3Bucket | None = None,
    base_dir: Path | None = None,
    check: Callable[[InputImage | bytes | str], InputImage] | None = None,
) -> ImageRequest:
    """`request` with every input and its mask checked (read once, decoded, hashed), or
    `InvalidRequestError` naming the input at fault. A generation is returned as it is.
    `check` checks one input image (default: `check_input`)."""
    if not request.is_edit:
        return request
    check = check or partial(check_input, bucket=bucket, base_dir=base_dir)
    images = tuple(check(ref) for ref in request.images)
    mask = request.mask
    if mask is not None:
        mask = check_mask(mask, images[0], bucket=bucket, base_dir=base_dir)
    return request.model_copy(update={"images": images, "mask": mask})


def check_edits(
    requests: Sequence[ImageRequest],
    *,
    bucket: S3Bucket | None = None,
    refused: Mapping[int, InvalidRequestError] | None = None,
) -> tuple[list[ImageRequest], dict[int, InvalidRequestError]]:
    """A run's requests with every edit's inputs checked, each distinct input once; and
    the requests refused for an input that is missing or not an image, by position, so
    that they fail alone and the rest go on. Those already `refused` (a prompt file's row
    naming an image outside its roots) are kept refused, and nothing is read for them."""
    seen: dict[str | bytes, InputImage | InvalidRequestError] = {}

    def checked(ref: InputImage | bytes | str) -> InputImage:
        if isinstance(ref, InputImage):
            return ref
        if ref not in seen:
            try:
                seen[ref] = check_input(ref, bucket=bucket)
            except InvalidRequestError as exc:
                seen[ref] = exc
        outcome = seen[ref]
        if isinstance(outcome, InvalidRequestError):
            raise outcome
        return outcome

    out: list[ImageRequest] = []
    failed = dict(refused or {})
    for index, request in enumerate(requests):
        if not request.is_edit or index in failed:
            out.append(request)
            continue
        try:
            request = checked_edit(request, bucket=bucket, check=checked)
        except InvalidRequestError as exc:
            failed[index] = exc
        out.append(request)
    if requests and len(failed) == len(requests):
        first = failed[min(failed)]
        raise InvalidRequestError(
            f"Every request's input images are missing, unusable or refused; nothing was sent. "
            f"The first: {first}"
        )
    return out, failed


def input_files(
    request: ImageRequest, *, bucket: S3Bucket | None = None
) -> tuple[list[InputFile], InputFile | None]:
    """The bytes of a checked edit's images and mask, read now: when the request is sent."""
    images = [_file(image, bucket) for image in request.images if isinstance(image, InputImage)]
    mask = _file(request.mask, bucket) if isinstance(request.mask, InputImage) else None
    return images, mask


def _file(image: InputImage, bucket: S3Bucket | None) -> InputFile:
    extension = image.media_type.rsplit("/", 1)[-1].replace("jpeg", "jpg")
    return f"{image.name}.{extension}", read_input(image, bucket=bucket), image.media_type
