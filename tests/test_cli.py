"""The `prefect-gpt-image` command, run as a user runs it: a separate process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from prefect_gpt_image import OpenAICredentials, cli
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server

COMMAND = str(Path(sys.executable).parent / "prefect-gpt-image")


def in_process(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The command's exit code, output and error output, run in this process (with this
    process's environment): the same code as the installed command, without a Python start.
    The tests that run a flow, or watch what a command imports, start the command itself."""
    capsys.readouterr()
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def command(
    user_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[[list[str]], Result]:
    """The command, run in this process in the user's environment (`user_env`)."""
    for name, value in user_env.items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)

    def command(args: list[str]) -> Result:
        return Result(*in_process(args, capsys))

    return command


def usage_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What the command prints for a usage error (it exits 2, before anything runs), run in
    this process: the same code path as the installed command, without a Python start."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    assert exited.value.code == 2
    return capsys.readouterr().err


def run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [COMMAND, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_help_is_quick_to_reach_and_lists_the_commands() -> None:
    result = subprocess.run([COMMAND, "--help"], capture_output=True, text=True, check=True)
    assert "generate" in result.stdout and "demo" in result.stdout


def test_generate_help_groups_the_flags_as_the_run_form_groups_the_options() -> None:
    result = subprocess.run([COMMAND, "generate", "--help"], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    sections = [line for line in result.stdout.splitlines() if line[:1].isalpha()]
    assert sections[-7:] == [
        "image:",
        "placements:",
        "edit:",
        "batch (OpenAI's Batch API):",
        "limits:",
        "cache:",
        "links:",
    ]
    limits = result.stdout.split("\nlimits:\n")[1].split("\ncache:\n")[0]
    assert "--max-concurrency" in limits and "GPT_IMAGE_MAX_CONCURRENCY" in limits


@pytest.mark.parametrize(
    ("flag", "value", "refusal"),
    [
        ("--size", "1536x", "'1536x' is not WIDTHxHEIGHT"),
        ("--max-concurrency", "0", "0 is out of range: give 1 to 256"),
        ("--link-expiry-hours", "a day", "'a day' is not a number"),
        ("--batch-wait-minutes", "2000", "2000 is out of range: give 0 to 1440"),
    ],
)
def test_a_flag_an_option_group_refuses_is_a_usage_error_naming_the_flag(
    tmp_path: Path, flag: str, value: str, refusal: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a refused racoon\n", "utf-8")

    stderr = usage_error(
        ["generate", str(prompts), "--bucket", "s3://anything", flag, value], capsys
    )

    (error,) = [line for line in stderr.splitlines() if "error:" in line]
    assert f"error: argument {flag}: " in error and refusal in error
    assert "Traceback" not in stderr


def test_flags_reach_the_flow_as_its_option_groups(
    tmp_path: Path,
    command: Callable[[list[str]], Result],
    monkeypatch: pytest.MonkeyPatch,
    api: GptImageEmulator,
    s3_server: LocalS3Server,
) -> None:
    bucket = f"cli-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a grouped gannet #{n}\n" for n in range(8)), "utf-8")
    api.latency = 0.3  # long enough for the run to fill its concurrency

    # The flag wins over the environment's setting.
    monkeypatch.setenv("GPT_IMAGE_MAX_CONCURRENCY", "1")
    result = command(
        [
            *("generate", str(prompts), "--bucket", f"s3://{bucket}"),
            *("--size", "1536x1024", "--quality", "high", "--max-concurrency", "3"),
        ]
    )

    assert result.returncode == 0, result.stderr
    assert "8 stored, 0 failed; 8 generated" in result.stdout
    assert {(c.width, c.height, c.body.get("quality")) for c in api.calls} == {(1536, 1024, "high")}
    assert api.peak_concurrency == 3


def test_a_flag_left_out_lets_the_environment_setting_apply(
    tmp_path: Path,
    command: Callable[[list[str]], Result],
    monkeypatch: pytest.MonkeyPatch,
    api: GptImageEmulator,
    s3_server: LocalS3Server,
) -> None:
    bucket = f"cli-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a settled sandpiper #{n}\n" for n in range(6)), "utf-8")
    api.latency = 0.3

    monkeypatch.setenv("GPT_IMAGE_MAX_CONCURRENCY", "2")
    result = command(["generate", str(prompts), "--bucket", f"s3://{bucket}"])

    assert result.returncode == 0, result.stderr
    assert "6 stored, 0 failed; 6 generated" in result.stdout
    assert api.peak_concurrency == 2  # not the flow's default, 8


def test_the_command_line_imports_no_prefect_boto3_or_rich_before_a_command_runs() -> None:
    loaded = (
        "import sys, prefect_gpt_image.cli; "
        "print(*[m for m in ('prefect', 'boto3', 'rich') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", loaded], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_generate_stores_a_prompt_file(
    tmp_path: Path, user_env: dict[str, str], api: GptImageEmulator, s3_server: LocalS3Server
) -> None:
    bucket = f"cli-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a command-line comet\nune comète en ligne de commande\n", "utf-8")

    result = run(
        ["generate", str(prompts), "--bucket", f"s3://{bucket}/cli", "--prefix", "p"], user_env
    )

    assert result.returncode == 0, result.stderr
    assert "2 stored, 0 failed; 2 generated, 0 from cache; cost $0.06" in result.stdout
    stored = sorted(s3_server.object_path(bucket, "cli/p").iterdir())
    images = [p for p in stored if p.suffix == ".png"]
    assert [p.name.rsplit("-", 1)[0] for p in images] == [
        "a-command-line-comet",
        "une-comete-en-ligne-de-commande",
    ]
    assert {p.read_bytes() for p in images} == set(api.served.values())
    assert any(p.name.startswith("manifest-") for p in stored)


def test_generate_reports_bad_input_without_a_traceback(
    tmp_path: Path, command: Callable[[list[str]], Result], api: GptImageEmulator
) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,colour\na cat,red\n", "utf-8")

    result = command(["generate", str(prompts), "--bucket", "s3://anything"])

    assert result.returncode == 2
    assert "prompts.csv, line 2: unknown field 'colour'" in result.stderr
    assert "Traceback" not in result.stderr
    assert api.calls == []


def test_generate_exits_1_when_prompts_fail(
    tmp_path: Path, command: Callable[[list[str]], Result], s3_server: LocalS3Server
) -> None:
    bucket = f"cli-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fine ferret\n[reject] a refused ferret\n", "utf-8")

    result = command(["generate", str(prompts), "--bucket", f"s3://{bucket}"])

    assert result.returncode == 1
    assert "FAILED '[reject] a refused ferret'" in result.stdout
    assert "1 of 2 prompts failed" in result.stderr


@pytest.mark.scenario
def test_demo_runs_end_to_end_with_nothing_configured(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAPIDAPI_"))}
    result = run(["demo", "--dir", str(tmp_path / "demo")], env, timeout=300)

    assert result.returncode == 0, result.stderr
    assert "12 stored, 0 failed; 11 generated, 0 from cache" in result.stdout
    folder = tmp_path / "demo" / "s3" / "gpt-image-demo" / "spring-campaign"
    assert len(list(folder.glob("*.png"))) == 11
    assert len(list(folder.glob("manifest-*.jsonl"))) == 1
    # The first route's model is retired; the second, gpt-image-2, made every image, and the
    # cost is its usage at gpt-image-2's token prices: 11 medium squares at 1,056 tokens,
    # $30 a million.
    assert "gpt-image-1.5 answered 'model not found'" in result.stdout
    assert "this run would have cost $0.35" in result.stdout

    again = run(["demo", "--dir", str(tmp_path / "demo")], env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "12 stored, 0 failed; 0 generated, 11 from cache; cost $0.00" in again.stdout


def test_price_shows_each_route_before_anything_is_paid(
    tmp_path: Path, command: Callable[[list[str]], Result], api: GptImageEmulator
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a priced pangolin\na priced puffin\n", "utf-8")

    result = command(
        ["price", str(prompts), "--size", "1536x864", "--quality", "medium", "--n", "2"]
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    (retiring,) = [line for line in lines if "api.openai.com gpt-image-1.5 " in line]
    assert "2 requests refused" in retiring and "cannot make 1536x864" in retiring
    (at,) = [n for n, line in enumerate(lines) if "api.openai.com gpt-image-2 " in line]
    # 4 images of 1536x864 at 1,767 tokens a square megapixel (OpenAI's $0.053 a medium
    # square), $30 a million, and the prompts.
    assert "$0.27  for 4 images ($0.13 through the Batch API)" in lines[at]
    assert "image output $30.00 per million tokens" in lines[at + 1]
    assert lines[at + 1].endswith("qualities low, medium, high, auto")
    for model in ("gpt-image-2.5-flare", "gpt-image-2.6-sunburst"):
        (at,) = [n for n, line in enumerate(lines) if f"api.openai.com {model} " in line]
        assert "Batch API" not in lines[at]  # sources disagree: not offered until a block says
        assert "qualities low, medium, high, xhigh, max, auto" in lines[at + 1]
        assert ("complexity low, medium, high" in lines[at + 1]) == ("2.6" in model)
    (rapidapi,) = [line for line in lines if "rapidapi" in line]
    assert "Batch API" not in rapidapi  # RapidAPI's route has none
    assert api.calls == []


def test_credentials_repeat_for_fallback_routes(
    tmp_path: Path,
    command: Callable[[list[str]], Result],
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    s3_server: LocalS3Server,
) -> None:
    names = [f"cli-retired-{uuid.uuid4().hex[:6]}", f"cli-successor-{uuid.uuid4().hex[:6]}"]
    api.models.pop("gpt-image-1.5", None)
    openai_credentials.model_copy(update={"model": "gpt-image-1.5"}).save(names[0])
    openai_credentials.save(names[1])
    bucket = f"cli-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fallback falcon\n", "utf-8")

    result = command(
        [
            *("generate", str(prompts), "--bucket", f"s3://{bucket}"),
            *("--credentials", names[0], "--credentials", names[1]),
        ]
    )

    assert result.returncode == 0, result.stderr
    assert [(c.model, c.status) for c in api.calls] == [
        ("gpt-image-1.5", 404),
        (openai_credentials.model, 200),
    ]


def test_generate_in_batch_mode_sends_one_batch_and_cancel_stops_it(
    tmp_path: Path,
    command: Callable[[list[str]], Result],
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    s3_server: LocalS3Server,
) -> None:
    name = f"cli-batch-{uuid.uuid4().hex[:6]}"
    openai_credentials.save(name)
    bucket = f"cli-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a batched badger\na batched bittern\n", "utf-8")
    args = [
        *("generate", str(prompts), "--bucket", f"s3://{bucket}", "--credentials", name),
        *("--mode", "batch", "--quality", "high"),
    ]
    api.batch_processing_seconds = 40  # in progress for half a minute; cancelling takes 4 s

    sent = command([*args, "--batch-wait-minutes", "0"])

    assert sent.returncode == 0, sent.stderr
    assert "2 waiting in OpenAI batches" in sent.stdout + sent.stderr  # it did not wait
    assert api.calls == [] and [b["status"] for b in api.batches] != ["cancelled"]
    (batch,) = api.batches
    key = openai_credentials.api_key.get_secret_value()
    sent_lines = httpx.get(
        f"{api.openai_base_url}/files/{batch['input_file_id']}/content",
        headers={"Authorization": f"Bearer {key}"},
    ).text.splitlines()
    assert [json.loads(line)["body"]["quality"] for line in sent_lines] == ["high", "high"]

    cancelled = command([*args, "--cancel-batches"])

    assert cancelled.returncode == 1  # the prompts were not made
    assert [b["status"] for b in api.batches] == ["cancelled"]
    assert api.calls == [] and api.stats["batches_created"] == 1


def test_generate_edits_a_folder_of_photos_with_every_prompt(
    tmp_path: Path,
    command: Callable[[list[str]], Result],
    api: GptImageEmulator,
    model_route: Callable[..., OpenAICredentials],
    s3_server: LocalS3Server,
) -> None:
    import hashlib
    import io

    from PIL import Image

    name = f"cli-editor-{uuid.uuid4().hex[:6]}"
    model_route("gpt-image-2.5-sunburst").save(name)  # takes input_fidelity
    photos = tmp_path / "photos"
    photos.mkdir()
    for colour in ("teal", "orange"):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), colour).save(buffer, "PNG")
        (photos / f"{colour}.png").write_bytes(buffer.getvalue())
    bucket = f"cli-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    prompts = tmp_path / "scenes.txt"
    prompts.write_text("on an oak table\non a marble counter\n", "utf-8")

    result = command(
        [
            *("generate", str(prompts), "--bucket", f"s3://{bucket}", "--credentials", name),
            *("--images", str(photos), "--input-fidelity", "high"),
        ]
    )

    assert result.returncode == 0, result.stderr
    assert "4 stored, 0 failed; 4 generated" in result.stdout
    sent = sorted((call.inputs[0], call.input_fidelity) for call in api.calls)
    assert sent == sorted(
        (hashlib.sha256(p.read_bytes()).hexdigest(), "high")
        for p in photos.iterdir()
        for _ in range(2)
    )


def test_placements_and_adapt_reach_the_flow(
    tmp_path: Path,
    command: Callable[[list[str]], Result],
    monkeypatch: pytest.MonkeyPatch,
    api: GptImageEmulator,
    s3_server: LocalS3Server,
) -> None:
    bucket = f"cli-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a placed pelican\n", "utf-8")
    monkeypatch.setenv("GPT_IMAGE_PLACEMENTS", '{"shop-tile": {"width": 400, "height": 300}}')

    result = command(
        [
            *("generate", str(prompts), "--bucket", f"s3://{bucket}"),
            *("--placement", "meta-feed-square", "--placement", "shop-tile"),
            *("--placement", "640x320", "--adapt", "crop"),
        ]
    )

    assert result.returncode == 0, result.stderr
    assert "1 image and 3 renditions stored, 0 failed; 1 generated" in result.stdout
    assert api.billed == 1
    stored = {p.name: p for p in s3_server.object_path(bucket, "").iterdir()}
    renditions = {
        rest.rsplit("-", 1)[0]: path
        for name, path in stored.items()
        if "-" in (rest := name.partition("-pelican-")[2])  # not the master
    }
    sizes = {name: Image.open(path).size for name, path in renditions.items()}
    assert sizes == {
        "meta-feed-square-1080x1080": (1080, 1080),
        "shop-tile-400x300": (400, 300),
        "640x320-640x320": (640, 320),
    }


def test_price_shows_each_adapt_strategy_side_by_side(
    tmp_path: Path, command: Callable[[list[str]], Result], api: GptImageEmulator
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a priced pangolin\na priced puffin\n", "utf-8")
    placements = ("meta-feed-square", "meta-reels", "meta-link")

    result = command(
        ["price", str(prompts), *(arg for p in placements for arg in ("--placement", p))]
    )

    assert result.returncode == 0, result.stderr
    assert f"each at 3 placements ({', '.join(placements)})" in result.stdout
    lines = result.stdout.splitlines()
    (line,) = [line for line in lines if "api.openai.com gpt-image-2 " in line]
    costs = dict(re.findall(r"(crop|extend|generate) \$([\d.,]+)", line))
    assert list(costs) == ["crop", "extend", "generate"]
    crop, extend, generate = (float(costs[a].replace(",", "")) for a in costs)
    assert 0 < crop < extend and crop < generate  # one paid image a prompt, against three
    rapidapi = next(n for n, line in enumerate(lines) if "rapidapi.com gpt-image" in line)
    assert "extend refused" in lines[rapidapi]
    assert "can edit images" in lines[rapidapi + 1]  # RapidAPI's endpoint only generates
    assert api.calls == []
