"""Bad input gets a message naming the file and line, and exit code 2, never a traceback:
old Mac line ends, a CSV cell past the csv module's limit, JSON nested past Python's
recursion limit, and numbers no flag can take."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import in_process, usage_error

from prefect_gpt_image._prompt_sets import MAX_JSON_DEPTH, load_prompts
from prefect_gpt_image.errors import InvalidRequestError
from prefect_gpt_image.models import ImageRequest
from prefect_gpt_image.testing import GptImageEmulator

CSV_FIELD_LIMIT = 131_072
"""Python's csv module refuses a field longer than this by default."""


def write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode())
    return path


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- Old Mac line ends -------------------------------------------------------------------


def test_a_txt_file_with_cr_line_ends_is_one_prompt_a_line(tmp_path: Path) -> None:
    path = write(tmp_path, "mac.txt", "# spring\ra fox at dawn\r\ra hare\r\nan owl\n")

    assert [r.prompt for r in load_prompts(path)] == ["a fox at dawn", "a hare", "an owl"]


def test_a_bad_line_in_a_cr_file_is_named_by_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "mac.txt", "a fox\r\rbad\x07bell\ra hare")

    with pytest.raises(InvalidRequestError) as raised:
        load_prompts(path)

    assert str(raised.value).startswith("mac.txt, line 3: prompt: the prompt holds a control")


def test_a_jsonl_file_with_cr_line_ends_reads_each_line(tmp_path: Path) -> None:
    path = write(tmp_path, "mac.jsonl", '"a fox"\r{"prompt": "a hare", "width": 512}\r')

    assert load_prompts(path) == [
        ImageRequest(prompt="a fox"),
        ImageRequest(prompt="a hare", width=512),
    ]


def test_the_command_line_prices_each_line_of_a_cr_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "mac.txt", "a fox at dawn\ra hare\ran owl")

    code, out, err = in_process(["price", str(path), "--model", "gpt-image-2"], capsys)

    assert code == 0, err
    assert f"3 requests in {path}" in out


# --- A CSV cell past the csv module's limit ------------------------------------------------


def test_a_csv_cell_past_the_limit_is_named_by_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, "big.csv", "prompt,name\nok,a\n" + "x" * (CSV_FIELD_LIMIT + 1) + ",b\nfine,c\n"
    )

    with pytest.raises(InvalidRequestError) as raised:
        load_prompts(path)

    message = str(raised.value)
    assert message.startswith("big.csv, line 3: a cell holds more than 131,072 characters")
    assert "a prompt may have at most 32,000" in message and "quotes" in message


def test_an_unclosed_quote_that_runs_past_the_limit_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "big.csv", 'prompt\nok\n"an unclosed quote\n' + "y\n" * CSV_FIELD_LIMIT)
    with pytest.raises(InvalidRequestError, match=r"^big\.csv, line \d+: a cell holds more than"):
        load_prompts(path)


def test_a_csv_header_past_the_limit_is_named_too(tmp_path: Path) -> None:
    path = write(tmp_path, "big.csv", "x" * (CSV_FIELD_LIMIT + 1) + "\nok\n")
    with pytest.raises(InvalidRequestError, match=r"^big\.csv, line 1: a cell holds more than"):
        load_prompts(path)


# --- JSON nested too deep --------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5_000, 200_000])
def test_deeply_nested_jsonl_is_named_by_its_line(tmp_path: Path, depth: int) -> None:
    """Past the limit, json raises RecursionError; before it, the request would still be
    too deep for what encodes and hashes it later."""
    path = write(
        tmp_path, "deep.jsonl", f'"ok"\n{{"prompt": "x", "extras": {{"a": {nested(depth - 2)}}}}}\n'
    )

    with pytest.raises(InvalidRequestError) as raised:
        load_prompts(path)

    assert str(raised.value).startswith(
        f"deep.jsonl, line 2: arrays or objects nested more than {MAX_JSON_DEPTH} deep."
    )


def test_jsonl_nested_up_to_the_limit_is_read(tmp_path: Path) -> None:
    line = f'{{"prompt": "x", "extras": {{"a": {nested(MAX_JSON_DEPTH - 2)}}}}}\n'
    (request,) = load_prompts(write(tmp_path, "ok.jsonl", line))
    assert request.prompt == "x"


# --- The command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "big.csv",
            "prompt\nok\n" + "x" * (CSV_FIELD_LIMIT + 1) + "\n",
            "big.csv, line 3: a cell holds more than 131,072 characters",
        ),
        (
            "deep.jsonl",
            '"ok"\n' + nested(100_000) + "\n",
            f"deep.jsonl, line 2: arrays or objects nested more than {MAX_JSON_DEPTH} deep",
        ),
    ],
)
@pytest.mark.parametrize("command", ["price", "generate"])
def test_the_command_line_says_what_is_wrong_and_exits_2(
    tmp_path: Path,
    command: str,
    name: str,
    content: str,
    message: str,
    api: GptImageEmulator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write(tmp_path, name, content)
    bucket = ["--bucket", "s3://anything"] if command == "generate" else []

    code, _, err = in_process([command, str(path), *bucket], capsys)

    assert code == 2, err
    assert f"Error: {message}" in err
    assert "Traceback" not in err
    assert api.calls == []


@pytest.mark.parametrize(
    ("flag", "value", "problem"),
    [
        ("--max-cost-usd", "-1", "-1 is out of range: give 0 or more"),
        ("--max-cost-usd", "nan", "'nan' is not a finite number"),
        ("--max-cost-usd", "ten", "'ten' is not a number"),
        ("--max-concurrency", "0", "0 is out of range: give 1 to 256"),
        ("--max-concurrency", "-4", "-4 is out of range: give 1 to 256"),
        ("--max-concurrency", "100000", "100000 is out of range: give 1 to 256"),
        ("--max-concurrency", "2.5", "'2.5' is not a whole number"),
        ("--requests-per-second", "0", "0 is out of range: give more than 0"),
        ("--requests-per-second", "-2", "-2 is out of range: give more than 0"),
        ("--requests-per-second", "inf", "'inf' is not a finite number"),
        ("--allow-failures", "-1", "-1 is out of range: give 0 or more"),
        ("--n", "0", "0 is out of range: give 1 to 10"),
        ("--n", "-3", "-3 is out of range: give 1 to 10"),
        ("--output-compression", "101", "101 is out of range: give 0 to 100"),
    ],
)
def test_a_flag_refuses_a_number_it_cannot_take(
    tmp_path: Path, flag: str, value: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = write(tmp_path, "p.txt", "a fine finch\n")

    stderr = usage_error(
        ["generate", str(prompts), "--bucket", "s3://anything", flag, value], capsys
    )

    assert f"error: argument {flag}: {problem}" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(("flag", "value"), [("--n", "0"), ("--output-compression", "-1")])
def test_price_refuses_the_same_numbers(
    tmp_path: Path, flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = write(tmp_path, "p.txt", "a fine finch\n")
    stderr = usage_error(["price", str(prompts), flag, value], capsys)
    assert f"error: argument {flag}: " in stderr
