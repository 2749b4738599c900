"""Input images for edits: checked once before anything is paid, from local files, S3,
bytes or earlier runs' images, and refused at send time if they changed since."""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path

import pytest
from PIL import Image
from prefect_aws import S3Bucket

from prefect_gpt_image import _edit_inputs
from prefect_gpt_image._edit_inputs import (
    InputRef,
    check_input,
    check_mask,
    expand_inputs,
    read_input,
)
from prefect_gpt_image.errors import InvalidRequestError
from prefect_gpt_image.models import InputImage, StoredImage
from prefect_gpt_image.testing import LocalS3Server


def image_bytes(
    size: tuple[int, int] = (16, 12), fmt: str = "PNG", mode: str = "RGB", colour: int = 90
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (colour,) * len(mode)).save(buffer, fmt)
    return buffer.getvalue()


def put(s3_server: LocalS3Server, bucket_name: str, key: str, data: bytes) -> str:
    s3_server.boto3_client().put_object(Bucket=bucket_name, Key=key, Body=data)
    return f"s3://{bucket_name}/{key}"


@pytest.fixture
def environment_s3(monkeypatch: pytest.MonkeyPatch, s3_server: LocalS3Server) -> None:
    """The environment's AWS credentials pointing at the test server, and a fresh client
    to read them."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setattr(_edit_inputs, "_environment_s3", None)


# --- Each kind of reference -------------------------------------------------------------------


def test_a_relative_path_is_read_from_base_dir_and_not_kept(tmp_path: Path) -> None:
    data = image_bytes((16, 12))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "mug.png").write_bytes(data)

    image = check_input("photos/mug.png", base_dir=tmp_path)

    assert image == InputImage(
        uri=(tmp_path / "photos" / "mug.png").resolve().as_uri(),
        sha256=hashlib.sha256(data).hexdigest(),
        media_type="image/png",
        size=len(data),
        width=16,
        height=12,
    )
    assert image.data is None
    assert image.uri.startswith("file:///")
    assert check_input(tmp_path / "photos" / "mug.png") == image
    assert check_input(image.uri) == image
    assert read_input(image) == data
    assert image.name == "mug"


def test_a_path_with_spaces_keeps_its_name(tmp_path: Path) -> None:
    path = tmp_path / "blue vase #2.jpg"
    path.write_bytes(image_bytes(fmt="JPEG"))

    image = check_input(path)

    assert image.media_type == "image/jpeg"
    assert image.name == "blue vase #2"
    assert read_input(image) == path.read_bytes()


def test_bytes_are_kept_and_named_by_their_hash() -> None:
    data = image_bytes(fmt="WEBP")

    image = check_input(data)

    assert (image.uri, image.media_type, image.data) == ("bytes:", "image/webp", data)
    assert image.name == hashlib.sha256(data).hexdigest()[:12]
    assert read_input(image) == data


def test_an_s3_uri_in_the_blocks_bucket_is_read_through_the_block(
    bucket: S3Bucket, s3_server: LocalS3Server
) -> None:
    data = image_bytes()
    uri = put(s3_server, bucket.bucket_name, "in/shoe #1?.png", data)

    image = check_input(uri, bucket=bucket)

    assert (image.uri, image.size, image.data) == (uri, len(data), None)
    assert image.name == "shoe #1?"
    assert read_input(image, bucket=bucket) == data


@pytest.mark.usefixtures("environment_s3")
def test_an_s3_uri_in_another_bucket_is_read_with_the_environments_credentials(
    bucket: S3Bucket, s3_server: LocalS3Server
) -> None:
    other = f"other-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(other)
    data = image_bytes()
    uri = put(s3_server, other, "shared/lamp.png", data)

    image = check_input(uri, bucket=bucket)

    assert image.uri == uri
    assert read_input(image, bucket=bucket) == data
    assert read_input(image) == data


def test_a_stored_image_is_read_from_its_bucket(bucket: S3Bucket, s3_server: LocalS3Server) -> None:
    data = image_bytes((20, 10))
    sha256 = hashlib.sha256(data).hexdigest()
    uri = put(s3_server, bucket.bucket_name, f"runs/chair-{sha256[:12]}.png", data)
    stored = StoredImage(
        bucket=bucket.bucket_name,
        key=f"runs/chair-{sha256[:12]}.png",
        uri=uri,
        sha256=sha256,
        size=len(data),
        media_type="image/png",
        width=20,
        height=10,
        prompt="a chair",
        model="gpt-image-1",
    )

    image = check_input(stored, bucket=bucket)

    assert (image.uri, image.sha256, image.width, image.height) == (uri, sha256, 20, 10)

    s3_server.boto3_client().put_object(
        Bucket=bucket.bucket_name, Key=stored.key, Body=image_bytes((20, 10), colour=7)
    )
    with pytest.raises(InvalidRequestError, match=r"is not the image stored there"):
        check_input(stored, bucket=bucket)


def test_a_checked_image_is_returned_as_it_is() -> None:
    image = check_input(image_bytes())

    assert check_input(image) is image


def test_the_same_bytes_under_two_names_have_one_sha256(
    tmp_path: Path, bucket: S3Bucket, s3_server: LocalS3Server
) -> None:
    data = image_bytes(fmt="JPEG")
    (tmp_path / "a.jpg").write_bytes(data)
    (tmp_path / "b.jpeg").write_bytes(data)
    uri = put(s3_server, bucket.bucket_name, "c.jpg", data)

    images = [
        check_input(tmp_path / "a.jpg"),
        check_input(tmp_path / "b.jpeg"),
        check_input(uri, bucket=bucket),
        check_input(data),
    ]

    assert {image.sha256 for image in images} == {hashlib.sha256(data).hexdigest()}
    assert len({image.uri for image in images}) == 4


# --- Refusals -----------------------------------------------------------------------------------


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "gone.png"

    with pytest.raises(InvalidRequestError) as refused:
        check_input("gone.png", base_dir=tmp_path)

    assert str(refused.value) == f"The input image {missing} does not exist: check the path."


def test_a_folder_given_as_an_image_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"is a folder, not an image file\.$"):
        check_input(tmp_path)


def test_a_missing_s3_key_is_named(bucket: S3Bucket) -> None:
    uri = f"s3://{bucket.bucket_name}/photos/gone.png"

    with pytest.raises(InvalidRequestError) as refused:
        check_input(uri, bucket=bucket)

    assert str(refused.value) == (
        f"Could not read the input image {uri}: no such object in bucket {bucket.bucket_name!r}."
    )


def test_a_text_file_named_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not a picture at all, but a secret-ish note")

    with pytest.raises(InvalidRequestError) as refused:
        check_input(path)

    message = str(refused.value)
    assert message.startswith(f"The input image {path} is 43 bytes that are not a readable")
    assert "secret" not in message


def test_a_truncated_image_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match=r"^The input image given as bytes is "):
        check_input(image_bytes(fmt="JPEG")[:-40])


def test_other_schemes_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match=r"give a local path or an s3:// URI\.$"):
        check_input("https://example.com/a.png")


def test_an_image_too_large_is_refused_before_it_is_decoded(
    tmp_path: Path, bucket: S3Bucket, s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_bytes()
    monkeypatch.setattr(_edit_inputs, "MAX_INPUT_BYTES", len(data))

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(_edit_inputs, "inspect_image", never)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    uri = put(s3_server, bucket.bucket_name, "big.png", data)

    cases: list[tuple[InputRef, str]] = [(path, str(path)), (uri, uri), (data, "given as bytes")]
    for ref, where in cases:
        with pytest.raises(InvalidRequestError) as refused:
            check_input(ref, bucket=bucket)
        assert str(refused.value).startswith(
            f"The input image {where} is {len(data):,} bytes; an input image must be under "
            f"{len(data):,} bytes"
        )


# --- Masks --------------------------------------------------------------------------------------


def test_a_mask_the_size_of_the_first_image_with_alpha_is_accepted(tmp_path: Path) -> None:
    first = check_input(image_bytes((16, 12)))
    (tmp_path / "mask.png").write_bytes(image_bytes((16, 12), mode="RGBA"))

    mask = check_mask("mask.png", first, base_dir=tmp_path)

    assert (mask.media_type, mask.width, mask.height, mask.data) == ("image/png", 16, 12, None)
    assert check_mask(mask, first) is mask
    assert check_mask(image_bytes((16, 12), mode="LA"), first).uri == "bytes:"


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (
            image_bytes((12, 16), mode="RGBA"),
            r"^The mask given as bytes is 12x16 pixels, and the first input image \(bytes:\) "
            r"is 16x12: a mask must be the size of the first image\.$",
        ),
        (
            image_bytes((16, 12)),
            r"^The mask given as bytes has no alpha channel; save it as a PNG with "
            r"transparency \(RGBA\)",
        ),
        (
            image_bytes((16, 12), fmt="JPEG"),
            r"^The mask given as bytes is image/jpeg; a mask must be a PNG with an alpha",
        ),
    ],
    ids=["wrong size", "no alpha", "jpeg"],
)
def test_a_bad_mask_is_refused_saying_why(mask: bytes, message: str) -> None:
    first = check_input(image_bytes((16, 12)))

    with pytest.raises(InvalidRequestError, match=message):
        check_mask(mask, first)


def test_a_palette_png_with_a_transparent_colour_has_no_alpha_channel() -> None:
    buffer = io.BytesIO()
    Image.new("P", (16, 12)).save(buffer, "PNG", transparency=0)
    first = check_input(image_bytes((16, 12)))

    with pytest.raises(InvalidRequestError, match=r"has no alpha channel"):
        check_mask(buffer.getvalue(), first)


def test_a_mask_too_large_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = image_bytes((16, 12), mode="RGBA")
    first = check_input(image_bytes((16, 12)))
    monkeypatch.setattr(_edit_inputs, "MAX_MASK_BYTES", len(data))
    path = tmp_path / "mask.png"
    path.write_bytes(data)

    with pytest.raises(InvalidRequestError, match=r"^The mask .*mask\.png is .*; a mask must"):
        check_mask(path, first)


# --- At send time -------------------------------------------------------------------------------


def test_a_file_changed_after_it_was_checked_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mug.png"
    path.write_bytes(image_bytes(colour=1))
    image = check_input(path)
    path.write_bytes(image_bytes(colour=2))

    with pytest.raises(InvalidRequestError) as refused:
        read_input(image)

    now = hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(refused.value) == (
        f"The input image {path} changed since it was checked: its SHA-256 is now "
        f"{now[:12]}, not {image.sha256[:12]}. Leave input images as they are until "
        "the run ends, or run again to check the new ones."
    )


def test_a_file_grown_after_it_was_checked_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "mug.png"
    path.write_bytes(image_bytes((8, 8)))
    image = check_input(path)
    path.write_bytes(image_bytes((64, 64), mode="RGBA") * 4)

    with pytest.raises(InvalidRequestError, match=r"changed since it was checked: it is now "):
        read_input(image)


def test_an_object_changed_after_it_was_checked_is_refused(
    bucket: S3Bucket, s3_server: LocalS3Server
) -> None:
    uri = put(s3_server, bucket.bucket_name, "mug.png", image_bytes(colour=1))
    image = check_input(uri, bucket=bucket)
    put(s3_server, bucket.bucket_name, "mug.png", image_bytes(colour=2))

    with pytest.raises(InvalidRequestError, match=rf"^The input image {uri} changed since"):
        read_input(image, bucket=bucket)


def test_bytes_that_are_not_those_checked_are_refused() -> None:
    image = check_input(image_bytes(colour=1))
    forged = image.model_copy(update={"data": image_bytes(colour=2)})

    with pytest.raises(InvalidRequestError, match=r"given as bytes changed since"):
        read_input(forged)


# --- Folders ------------------------------------------------------------------------------------


def test_a_local_folder_gives_its_images_by_name(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ["b.JPG", "a.png", "c.webp", "notes.txt", "._a.png", ".hidden.png"]:
        (photos / name).write_bytes(image_bytes())
    (photos / "nested.png").mkdir()

    refs = expand_inputs("photos", base_dir=tmp_path)

    assert refs == [photos / "a.png", photos / "b.JPG", photos / "c.webp"]
    assert [check_input(ref).name for ref in refs] == ["a", "b", "c"]


def test_an_s3_folder_gives_its_images_by_key(bucket: S3Bucket, s3_server: LocalS3Server) -> None:
    for key in ["in/b.jpeg", "in/a.png", "in/notes.txt", "in/deeper/c.png", "inbox/d.png"]:
        put(s3_server, bucket.bucket_name, key, image_bytes())

    refs = expand_inputs(f"s3://{bucket.bucket_name}/in/", bucket=bucket)

    assert refs == [f"s3://{bucket.bucket_name}/in/a.png", f"s3://{bucket.bucket_name}/in/b.jpeg"]


def test_an_empty_folder_is_refused(tmp_path: Path, bucket: S3Bucket) -> None:
    with pytest.raises(InvalidRequestError, match=r"^The folder .* holds no PNG, JPEG or WebP"):
        expand_inputs(tmp_path)
    with pytest.raises(InvalidRequestError, match=r"empty/ holds no PNG, JPEG or WebP"):
        expand_inputs(f"s3://{bucket.bucket_name}/empty/", bucket=bucket)


def test_one_image_or_a_list_is_taken_as_it_is(tmp_path: Path) -> None:
    data = image_bytes()

    assert expand_inputs("mug.png", base_dir=tmp_path) == [tmp_path.resolve() / "mug.png"]
    assert expand_inputs("s3://b/k.png") == ["s3://b/k.png"]
    assert expand_inputs(data) == [data]
    assert expand_inputs(["x.png", data]) == ["x.png", data]
    with pytest.raises(InvalidRequestError, match=r"^No input images were given"):
        expand_inputs([])


def test_another_bucket_without_environment_credentials_says_what_to_set(
    bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, s3_server: LocalS3Server
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setattr(_edit_inputs, "_environment_s3", None)

    with pytest.raises(InvalidRequestError) as refused:
        check_input("s3://elsewhere/a.png", bucket=bucket)

    assert str(refused.value).startswith(
        "Cannot read the input image s3://elsewhere/a.png: it is not in the S3Bucket block's "
        "bucket, so it is read with the environment's AWS credentials, and there are none."
    )
