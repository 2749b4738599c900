"""Loading prompt sets from lists and from .txt, .csv and .jsonl files, local or on S3."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from prefect_aws import S3Bucket

from prefect_gpt_image._prompt_sets import load_prompts
from prefect_gpt_image._storage import read_uri
from prefect_gpt_image.errors import InvalidRequestError, StorageError
from prefect_gpt_image.models import ImageRequest
from prefect_gpt_image.testing import LocalS3Server


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_load_from_a_list_applies_default_sizes() -> None:
    own = ImageRequest(prompt="kept as given", width=512, height=512)
    requests = load_prompts(
        ["a fox", {"prompt": "a hare", "height": 1536, "name": "hare"}, own],
        width=1536,
        height=1024,
    )
    assert requests == [
        ImageRequest(prompt="a fox", width=1536, height=1024),
        ImageRequest(prompt="a hare", width=1536, height=1536, name="hare"),
        own,
    ]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "The prompt set is empty."),
        (["ok", "  "], "prompt #2: prompt: the prompt is empty or only whitespace"),
        ([{"prompt": "x", "colour": "red"}], "prompt #1: unknown field 'colour'"),
        ([{"prompt": "x", "width": 10}], "prompt #1: width: Input should be greater than"),
    ],
)
def test_load_from_a_list_names_the_bad_item(items: list[object], message: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        load_prompts(items)  # type: ignore[arg-type]
    assert str(raised.value).startswith(message)


def test_load_txt_skips_blank_lines_and_comments(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.txt",
        "# spring set\n\na fox at dawn\n  # indented comment\nÉté à Paris, 東京\n",
    )
    assert [(r.prompt, r.width) for r in load_prompts(path, width=512)] == [
        ("a fox at dawn", 512),
        ("Été à Paris, 東京", 512),
    ]


def test_load_csv_reads_columns_and_extras(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.csv",
        "\ufeffprompt,width,name,extras.quality,extras.background\n"
        'a fox,512,fox,high,transparent\n"a hare, running",,,low,\n,,,,\n',
    )
    assert load_prompts(str(path), height=768) == [
        ImageRequest(
            prompt="a fox",
            width=512,
            height=768,
            name="fox",
            extras={"quality": "high", "background": "transparent"},
        ),
        ImageRequest(prompt="a hare, running", height=768, extras={"quality": "low"}),
    ]


def test_load_jsonl_reads_objects_and_strings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.jsonl",
        '{"prompt": "a fox", "extras": {"quality": "high"}}\n\n"a hare"\n'
        '{"prompt": "東京", "width": 512}\n',
    )
    assert load_prompts(path) == [
        ImageRequest(prompt="a fox", extras={"quality": "high"}),
        ImageRequest(prompt="a hare"),
        ImageRequest(prompt="東京", width=512),
    ]


CONTROL = "prompt: the prompt holds a control character"


@pytest.mark.parametrize(
    ("name", "content", "line", "problem"),
    [
        ("p.csv", "prompt,colour\na fox,red\n", 2, "unknown field 'colour' (known: prompt,"),
        ("p.csv", "prompt,name\nok,a\n,b\n", 3, "prompt: Field required"),
        ("p.csv", "prompt\nok\nx,y\n", 3, "more cells than columns."),
        ("p.csv", "text,width\na fox,512\n", 1, "a CSV prompt file needs a 'prompt' column."),
        ("p.jsonl", '"ok"\n{"prompt": "x", "seed": 1}\n', 2, "unknown field 'seed'"),
        ("p.jsonl", '"ok"\n\n{"prompt": "x",}\n', 3, "not valid JSON ("),
        ("p.jsonl", '"ok"\n[1, 2]\n', 2, "expected an object or a string."),
        ("p.jsonl", '"ok"\n{"prompt": ""}\n', 2, "prompt: String should have at least 1 char"),
        ("p.txt", "ok\n" + "x" * 32_001, 2, "prompt: String should have at most 32000 char"),
        ("p.txt", "ok\n# c\nbad\x07bell\n", 3, f"{CONTROL} ('\\x07') at position 3"),
        ("p.jsonl", '"ok"\n"a\\u0000b"\n', 2, f"{CONTROL} ('\\x00') at position 1"),
    ],
)
def test_bad_line_is_named_by_file_and_line(
    tmp_path: Path, name: str, content: str, line: int, problem: str
) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(InvalidRequestError) as raised:
        load_prompts(path)
    assert str(raised.value).startswith(f"{name}, line {line}: {problem}")


@pytest.mark.parametrize(
    ("name", "content"),
    [("p.txt", ""), ("p.txt", "# only a comment\n\n"), ("p.csv", "prompt\n"), ("p.jsonl", "\n")],
)
def test_file_without_prompts_is_refused(tmp_path: Path, name: str, content: str) -> None:
    with pytest.raises(InvalidRequestError, match=rf"^{name} holds no prompts\.$"):
        load_prompts(write(tmp_path, name, content))


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(InvalidRequestError) as raised:
        load_prompts(missing)
    assert str(raised.value) == f"Cannot read the prompt file {missing}: No such file or directory."

    latin1 = write(tmp_path, "latin1.txt", "ok\ncafé\n".encode("latin-1"))
    with pytest.raises(InvalidRequestError) as raised:
        load_prompts(latin1)
    assert str(raised.value) == f"The prompt file {latin1} is not UTF-8 text (byte 6)."


@pytest.mark.parametrize("name", ["prompts.docx", "prompts", "prompts.json", "s3://b/p.xlsx"])
def test_unsupported_suffix_is_refused_before_reading(name: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        load_prompts(name)
    assert str(raised.value) == (
        f"{name!r} is not a prompt file: prompts must be a list, or the path or "
        "s3:// URI of a .txt, .csv, .jsonl file."
    )


def test_s3_uri_without_a_bucket_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match=r"^Cannot read s3://b/p\.txt: no S3 bucket"):
        load_prompts("s3://b/p.txt")


def test_load_from_s3(bucket: S3Bucket, s3_server: LocalS3Server) -> None:
    s3_server.boto3_client().put_object(
        Bucket=bucket.bucket_name,
        Key="sets/spring.csv",
        Body="\ufeffprompt,extras.quality\na fox,high\nÉté,\n".encode(),
    )
    reader = functools.partial(read_uri, bucket)
    requests = load_prompts(f"s3://{bucket.bucket_name}/sets/spring.csv", read_uri=reader)
    assert requests == [
        ImageRequest(prompt="a fox", extras={"quality": "high"}),
        ImageRequest(prompt="Été"),
    ]

    missing = f"s3://{bucket.bucket_name}/sets/missing.txt"
    with pytest.raises(StorageError) as raised:
        load_prompts(missing, read_uri=reader)
    assert str(raised.value) == (
        f"Could not read {missing}: no such object in bucket {bucket.bucket_name!r}."
    )
    assert not raised.value.retryable
