"""The images a prompt file names: only below its own folder (or its bucket and prefix), or
under roots the user named; anything else is refused for its row, by its name alone, before
any call. A row S3 refuses to read fails alone too."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ParamValidationError
from PIL import Image
from prefect_aws import S3Bucket

from prefect_gpt_image import ImageRequest, OpenAICredentials, generate_images
from prefect_gpt_image._edits import check_edits
from prefect_gpt_image._prompt_sets import load_prompts, read_prompt_set
from prefect_gpt_image._storage import storage_error
from prefect_gpt_image.cli import main
from prefect_gpt_image.errors import InvalidRequestError, RunFailedError
from prefect_gpt_image.models import RunReport
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server


def photo(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), colour).save(buffer, "PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


RECORD = {
    "uri": "file:///etc/shadow",
    "sha256": "0" * 64,
    "media_type": "image/png",
    "size": 1,
    "width": 64,
    "height": 64,
}
"""A checked input's record, which would otherwise name a file read unchecked."""


def jsonl(*rows: dict[str, Any]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def edits_at(api: GptImageEmulator) -> list[Any]:
    return [call for call in api.calls if call.path.endswith("/images/edits")]


def manifest_text(s3_server: LocalS3Server, bucket: S3Bucket, report: RunReport) -> str:
    assert report.manifest_key
    answer = s3_server.boto3_client().get_object(Bucket=bucket.bucket_name, Key=report.manifest_key)
    return answer["Body"].read().decode()


def refusal(report: RunReport, prompt: str) -> str:
    (failure,) = [f for f in report.failures if f.prompt == prompt]
    assert failure.stage == "check" and failure.error_type == "InvalidRequestError"
    return failure.error


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every path this process stats, opens or lists while the test runs."""
    seen: list[str] = []
    for name in ("stat", "lstat"):
        real = getattr(os, name)

        def recorded(path: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            seen.append(os.fsdecode(path) if isinstance(path, str | bytes) else str(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, recorded)
    _AUDIT.append(seen)
    yield seen
    _AUDIT.remove(seen)


_AUDIT: list[list[str]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _AUDIT and event in ("open", "os.listdir", "os.scandir") and args:
        path = args[0]
        if isinstance(path, str | bytes | os.PathLike):
            _AUDIT[-1].append(os.fsdecode(path))


sys.addaudithook(_audit)


# --- Loading: refused by name alone ---------------------------------------------------------


def test_a_local_prompt_files_images_stay_below_its_folder_and_outside_is_never_probed(
    tmp_path: Path, probes: list[str]
) -> None:
    folder = tmp_path / "campaign"
    (folder / "photos").mkdir(parents=True)
    (folder / "photos" / "mug.png").write_bytes(photo("teal"))
    private = tmp_path / "private"
    private.mkdir()
    (private / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (folder / "escape.png").symlink_to(private / "id_rsa")
    prompts = folder / "scenes.jsonl"
    prompts.write_text(
        jsonl(
            {"prompt": "beside it", "images": ["photos/mug.png"]},
            {"prompt": "key", "images": [str(private / "id_rsa")]},
            {"prompt": "no such file", "images": [str(private / "id_rsa.pub")]},
            {"prompt": "up and out", "images": ["../private/id_rsa"]},
            {"prompt": "as a URI", "images": [(private / "id_rsa").as_uri()]},
            {"prompt": "a link out", "images": ["escape.png"]},
            {"prompt": "a mask out", "images": ["photos/mug.png"], "mask": "/etc/shadow"},
            {"prompt": "a record", "images": [RECORD]},
        )
    )
    probes.clear()

    prompt_set = read_prompt_set(prompts)
    requests, refused = check_edits(prompt_set.requests, refused=prompt_set.refused)

    assert sorted(refused) == [1, 2, 3, 4, 5, 6, 7]
    assert any(Path(path).is_relative_to(folder) for path in probes)  # the probes are seen
    assert requests[0].inputs[0].sha256 == sha((folder / "photos" / "mug.png").read_bytes())
    # Nothing outside the folder was opened, listed or even looked up (the link was looked
    # up where it is, in the folder; what it points at is judged by its name).
    outside = [path for path in probes if not Path(path).is_relative_to(folder)]
    assert [p for p in outside if p.startswith(str(private)) or p == "/etc/shadow"] == []
    # The refusal reads the same whether the file is there or not: it cannot tell.
    there, not_there = str(refused[1]), str(refused[2])
    assert there.replace("line 2", "line 3").replace("id_rsa'", "id_rsa.pub'") == not_there
    assert str(refused[1]) == (
        f"scenes.jsonl, line 2: refused, and nothing read for it: the input image "
        f"'{private / 'id_rsa'}' is not below the prompt file's folder or an input root "
        f"({folder}). A prompt file may name only images below its own folder; to edit "
        "images elsewhere, name their folder in edit.input_roots (--input-root on the command "
        "line)."
    )
    assert "'../private/id_rsa'" in str(refused[3])
    assert "the mask '/etc/shadow'" in str(refused[6])
    assert "as a JSON dict" in str(refused[7])
    for error in refused.values():
        assert "bytes" not in str(error) and "exist" not in str(error)


def test_input_roots_name_more_folders_and_load_prompts_refuses_what_they_do_not(
    tmp_path: Path,
) -> None:
    folder, shared = tmp_path / "campaign", tmp_path / "shared"
    folder.mkdir()
    shared.mkdir()
    (shared / "mug.png").write_bytes(photo("teal"))
    prompts = folder / "scenes.csv"
    prompts.write_text("prompt,image\nthe mug,../shared/mug.png\n")

    with pytest.raises(InvalidRequestError, match=r"^scenes\.csv, line 2: refused"):
        load_prompts(prompts)
    (request,) = load_prompts(prompts, input_roots=[str(shared)])
    assert request.images == (str(shared / "mug.png"),)
    with pytest.raises(InvalidRequestError, match="neither a local folder nor an s3:// URI"):
        load_prompts(prompts, input_roots=["https://example.com/photos/"])


def test_an_s3_prompt_files_images_stay_in_its_bucket_and_prefix(
    bucket: S3Bucket, s3_server: LocalS3Server
) -> None:
    name = bucket.bucket_name
    s3_server.boto3_client().put_object(
        Bucket=name,
        Key="sets/scenes.jsonl",
        Body=jsonl(
            {"prompt": "beside it", "images": ["photos/mug.png"]},
            {"prompt": "its own key", "images": [f"s3://{name}/sets/vase.png"]},
            {"prompt": "the worker's file", "images": ["/etc/hostname"]},
            {"prompt": "up and out", "images": ["../x.png"]},
            {"prompt": "out of the bucket", "images": ["../../../x.png"]},
            {"prompt": "another prefix", "images": [f"s3://{name}/private/x.png"]},
            {"prompt": "dots in a key", "images": [f"s3://{name}/sets/../private/x.png"]},
            {"prompt": "another bucket", "images": ["s3://elsewhere/sets/x.png"]},
        ).encode(),
    )
    read = read_prompt_set(f"s3://{name}/sets/scenes.jsonl", read_uri=_reader(bucket))

    assert sorted(read.refused) == [2, 3, 4, 5, 6, 7]
    assert read.requests[0].images == (f"s3://{name}/sets/photos/mug.png",)
    assert f"({'s3://' + name + '/sets/'})" in str(read.refused[2])

    wider = read_prompt_set(
        f"s3://{name}/sets/scenes.jsonl",
        read_uri=_reader(bucket),
        input_roots=[f"s3://{name}/private"],
    )
    assert sorted(wider.refused) == [2, 3, 4, 6, 7]


def _reader(bucket: S3Bucket) -> Any:
    from functools import partial

    from prefect_gpt_image._storage import read_uri

    return partial(read_uri, bucket)


# --- The flow: the row fails alone, before any call -------------------------------------------


def test_an_s3_prompt_file_cannot_make_the_worker_send_its_own_files(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    tmp_path: Path,
) -> None:
    name, client = bucket.bucket_name, s3_server.boto3_client()
    mug = photo("teal")
    client.put_object(Bucket=name, Key="sets/photos/mug.png", Body=mug)
    private = tmp_path / "private.png"
    private.write_bytes(photo("crimson"))
    key = tmp_path / "id_rsa"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n" + "x" * 1_234)
    client.put_object(
        Bucket=name,
        Key="sets/scenes.jsonl",
        Body=jsonl(
            {"prompt": "the mug on oak", "images": ["photos/mug.png"]},
            {"prompt": "the private photo", "images": [str(private)]},
            {"prompt": "the key", "images": [str(key)]},
        ).encode(),
    )

    report = generate_images(
        f"s3://{name}/sets/scenes.jsonl",
        bucket=bucket,
        credentials=openai_credentials,
        prefix="out",
        allow_failures=2,
    )

    # The good row is generated and stored; the two others cost no call.
    (call,) = edits_at(api)
    assert call.inputs == [sha(mug)]
    assert len(report.images) == 1 and report.images[0].inputs[0].sha256 == sha(mug)
    stored = client.get_object(Bucket=name, Key=report.images[0].key)["Body"].read()
    assert sha(stored) == report.images[0].sha256
    assert "not below the prompt file's folder" in refusal(report, "the private photo")
    # Nothing says whether the worker's files are there, or how large.
    manifest = manifest_text(s3_server, bucket, report)
    for size in (private.stat().st_size, key.stat().st_size):
        assert f"{size:,}" not in manifest and str(size) not in manifest
    assert "does not exist" not in manifest and "not an image" not in manifest.lower()


def test_a_local_prompt_file_may_reach_a_folder_the_user_names(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    tmp_path: Path,
) -> None:
    (tmp_path / "campaign").mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "vase.png").write_bytes(photo("orange"))
    (tmp_path / "campaign" / "mug.png").write_bytes(photo("teal"))
    prompts = tmp_path / "campaign" / "scenes.csv"
    prompts.write_text("prompt,image\nthe mug,mug.png\nthe vase,../shared/vase.png\n")

    with pytest.raises(RunFailedError) as failed:
        generate_images(str(prompts), bucket=bucket, credentials=openai_credentials)
    assert len(edits_at(api)) == 1 and len(failed.value.report.images) == 1
    assert "'../shared/vase.png'" in refusal(failed.value.report, "the vase")

    report = generate_images(
        str(prompts),
        bucket=bucket,
        credentials=openai_credentials,
        edit={"input_roots": [str(tmp_path / "shared")]},
    )
    assert len(report.images) == 2 and not report.failures
    assert len(edits_at(api)) == 2  # the mug came from the cache


def test_images_named_in_code_are_the_users_own_choice(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    tmp_path: Path,
) -> None:
    source = tmp_path / "elsewhere" / "mug.png"
    source.parent.mkdir()
    source.write_bytes(photo("teal"))

    report = generate_images(
        [ImageRequest(prompt="the mug on oak", images=[str(source)])],
        bucket=bucket,
        credentials=openai_credentials,
    )

    assert len(report.images) == 1 and len(edits_at(api)) == 1


def test_the_command_line_takes_input_roots(
    tmp_path: Path,
    user_env: dict[str, str],
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    s3_server: LocalS3Server,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "campaign").mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "mug.png").write_bytes(photo("teal"))
    prompts = tmp_path / "campaign" / "scenes.csv"
    prompts.write_text("prompt,image\nthe mug on oak,../shared/mug.png\nthe sky,\n")
    shared = str(tmp_path / "shared")

    assert main(["price", str(prompts), "--model", "gpt-image-2"]) == 0
    assert "1 requests in" in capsys.readouterr().out  # the refused row is not priced
    assert main(["price", str(prompts), "--model", "gpt-image-2", "--input-root", shared]) == 0
    assert "2 requests in" in capsys.readouterr().out

    name = f"cli-editor-{uuid.uuid4().hex[:6]}"
    openai_credentials.save(name)
    bucket = f"cli-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "prefect-gpt-image"),
            *("generate", str(prompts), "--bucket", f"s3://{bucket}", "--credentials", name),
            *("--input-root", shared),
        ],
        env=user_env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "2 stored, 0 failed; 2 generated" in result.stdout
    assert [call.inputs for call in edits_at(api)] == [[sha(photo("teal"))]]


def test_a_row_s3_refuses_to_read_fails_alone(
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    name, client = bucket.bucket_name, s3_server.boto3_client()
    mug = photo("teal")
    client.put_object(Bucket=name, Key="sets/mug.png", Body=mug)
    client.put_object(
        Bucket=name,
        Key="sets/scenes.csv",
        Body=(
            "prompt,image\n"
            "the mug on oak,mug.png\n"
            f"a name S3 refuses,s3://{name}/sets//mug.png\n"
            "up and out,../x.png\n"
        ).encode(),
    )

    report = generate_images(
        f"s3://{name}/sets/scenes.csv",
        bucket=bucket,
        credentials=openai_credentials,
        allow_failures=2,
    )

    assert [call.inputs for call in edits_at(api)] == [[sha(mug)]]
    assert len(report.images) == 1
    assert "refused it (InvalidArgument: " in refusal(report, "a name S3 refuses")
    assert "'../x.png'" in refusal(report, "up and out")


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} said"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "GetObject",
    )


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (_client_error("InvalidArgument", 400), False),
        (_client_error("KeyTooLongError", 400), False),
        (_client_error("SomethingNew", 400), False),
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("SomethingNew", 502), True),
        (_client_error("RequestTimeout", 400), True),
        (ParamValidationError(report="Invalid length for parameter Key"), False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), True),
    ],
)
def test_only_s3_failures_that_may_pass_are_retried(error: Exception, retryable: bool) -> None:
    assert storage_error(error, "b", "read x").retryable is retryable
