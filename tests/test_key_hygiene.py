"""The API key, on both routes: a pasted key with whitespace around it works, a key no HTTP
header can carry is refused without being shown, and no error that leaves a task quotes it.

A key with a trailing newline (a Kubernetes secret made from a file) once reached httpx,
which refused the header in a message holding the key: the message then went to the state,
the logs, the manifest and the artifacts, four retries over.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import State
from prefect_aws import S3Bucket
from pydantic import SecretStr, ValidationError

from prefect_gpt_image import (
    OpenAICredentials,
    RapidAPICredentials,
    generate_image,
    generate_images,
)
from prefect_gpt_image._batch_api import BatchApiClient
from prefect_gpt_image._charges import Charges
from prefect_gpt_image._redaction import scrub, scrub_error
from prefect_gpt_image.blocks._route import GptImageRoute
from prefect_gpt_image.errors import (
    APIConnectionError,
    ConfigurationError,
    RunFailedError,
    ServerError,
)
from prefect_gpt_image.testing import Fault, GptImageEmulator, LocalS3Server

LOGGERS = ("", "prefect", "prefect_gpt_image", "httpx", "openai", "botocore")
NOT_OURS = ("httpcore",)
"""httpcore's DEBUG trace quotes a header it refuses, key and all: a key that skipped the
block's validation shows there, in the process only, whatever the product does. What the
product writes, and everything Prefect stores, is checked."""


def leaked(text: str, key: str) -> bool:
    """Whether any ten characters in a row of the key are in `text`: a key split by a bad
    character, or quoted with escapes, leaks in parts."""
    key = key.strip()
    return any(key[i : i + 10] in text for i in range(len(key) - 9))


@pytest.fixture(params=["rapidapi", "openai"])
def route(
    request: pytest.FixtureRequest,
    credentials: RapidAPICredentials,
    openai_credentials: OpenAICredentials,
) -> GptImageRoute:
    """Each route to the emulator in turn."""
    return credentials if request.param == "rapidapi" else openai_credentials


def with_key(route: GptImageRoute, key: str) -> GptImageRoute:
    """The route with `key`, validated as a block built in code or loaded from Prefect is."""
    return type(route).model_validate({**dict(route), "api_key": key})


def unchecked(route: GptImageRoute, key: str) -> GptImageRoute:
    """The route with `key` and no validation (`model_copy` skips it), so that the key
    reaches httpx: the last line of defence must hold on its own."""
    return route.model_copy(update={"api_key": SecretStr(key)})


class Everything(logging.Handler):
    """Keeps every record, with its traceback, at every level."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(NOT_OURS):
            self.lines.append(self.format(record))


@pytest.fixture
def debug_logs() -> Iterator[Everything]:
    handler = Everything()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)
        logger.removeHandler(handler)


# --- Whitespace around the key -----------------------------------------------------------


@pytest.mark.parametrize("pasted", ["{key}\n", "  {key} \r\n"])
def test_a_key_with_whitespace_around_it_is_stripped_and_works(
    pasted: str,
    route: GptImageRoute,
    api_key: str,
    api: GptImageEmulator,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    block = with_key(route, pasted.format(key=api_key))
    assert block.api_key.get_secret_value() == api_key

    report = generate_images(["a freshly pasted pelican"], bucket=bucket, credentials=block)

    # The emulator answers 401 to any key but its own: it was sent stripped, once.
    assert [call.status for call in api.calls] == [200]
    (image,) = report.images
    stored = s3_server.boto3_client().get_object(Bucket=bucket.bucket_name, Key=image.key)
    assert stored["Body"].read() == api.served[image.sha256]


def test_the_key_from_the_environment_is_stripped_too(
    api_key: str, api: GptImageEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAPIDAPI_KEY", f"{api_key}\n")
    monkeypatch.setenv("RAPIDAPI_BASE_URL", api.base_url)
    assert RapidAPICredentials.from_env().api_key.get_secret_value() == api_key


@pytest.mark.parametrize("block", [RapidAPICredentials, OpenAICredentials])
def test_the_field_says_the_key_is_stripped(block: type[GptImageRoute]) -> None:
    description = block.model_json_schema()["properties"]["api_key"]["description"]
    assert "whitespace" in description and description.endswith(".")


# --- A key no header can carry -----------------------------------------------------------


@pytest.mark.parametrize("block", [RapidAPICredentials, OpenAICredentials])
@pytest.mark.parametrize(
    ("position", "char", "problem"),
    [
        (9, "\x00", "a control character (U+0000) at position 10"),
        (9, "\n", "a control character (U+000A) at position 10"),
        (9, "\t", "a control character (U+0009) at position 10"),
        (-1, "\x7f", "a control character (U+007F) at position 26"),
        (9, "é", "a non-ASCII character at position 10"),
        (9, "\u200b", "a non-ASCII character at position 10"),
    ],
)
def test_a_key_no_header_can_carry_is_refused_without_being_shown(
    block: type[GptImageRoute], position: int, char: str, problem: str, api_key: str
) -> None:
    at = position if position >= 0 else len(api_key)
    bad = api_key[:at] + char + api_key[at:]

    with pytest.raises(ValidationError) as raised:
        block(api_key=bad)

    error = raised.value
    assert problem in str(error) and "copy the key again" in str(error)
    for text in (str(error), repr(error), repr(error.errors()), error.json()):
        assert not leaked(text, api_key), text
    assert not leaked(repr(pickle.loads(pickle.dumps(error)).errors()), api_key)


@pytest.mark.parametrize("given", ["", " \n", 12345678901234567890])
def test_an_empty_or_non_text_key_is_refused(given: object) -> None:
    with pytest.raises(ValidationError) as raised:
        RapidAPICredentials(api_key=given)  # type: ignore[arg-type]
    assert "The API key " in str(raised.value)
    assert "12345678901234567890" not in str(raised.value) + repr(raised.value.errors())


def test_a_bad_key_in_the_environment_stops_the_flow_before_any_call(
    api_key: str, api: GptImageEmulator, bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAPIDAPI_KEY", f"{api_key[:9]}\x01{api_key[9:]}")
    monkeypatch.setenv("RAPIDAPI_BASE_URL", api.base_url)

    state = generate_images(["a refused wren"], bucket=bucket, return_state=True)

    assert state.is_failed()
    assert api.calls == []
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ConfigurationError)
    assert "a control character (U+0001) at position 10" in str(error)
    written = _what_prefect_stored(state.state_details.flow_run_id, "env")
    written["error"] = "".join(traceback.format_exception(error))
    written["state"] = f"{state!r} {state.message}"
    for where, text in written.items():
        assert not leaked(text, api_key), f"the API key leaked into {where}"


# --- No error leaves a task with the key in it -------------------------------------------


@flow
def one_generation(prompt: str, route: GptImageRoute) -> None:
    """A flow of one generation, not retried, so that it fails at its first error."""
    generate_image.with_options(retries=0)(prompt, route)


def test_an_error_quoting_the_key_leaves_the_task_scrubbed(
    route: GptImageRoute, api_key: str, api: GptImageEmulator, session_dir: Path
) -> None:
    broken = unchecked(route, f"{api_key}\n")  # httpx refuses the header, quoting it

    state = one_generation(
        f"a header-breaking heron {uuid.uuid4().hex[:6]}", broken, return_state=True
    )

    error = state.result(raise_on_failure=False)
    assert type(error) is APIConnectionError
    assert "Illegal header value" in str(error) and "***" in str(error)
    assert api.calls == []
    written = _what_prefect_stored(state.state_details.flow_run_id, "flow")
    written["error"] = "".join(traceback.format_exception(error)) + repr(error)
    written["pickled error"] = repr(pickle.loads(pickle.dumps(error)).args)
    written["state"] = f"{state!r} {state.message}"
    written.update(_prefect_home(session_dir))
    assert "Illegal header value" in written["flow api logs"]
    for where, text in written.items():
        assert not leaked(text, api_key), f"the API key leaked into {where}"


def test_the_key_appears_nowhere_on_either_route(
    route: GptImageRoute,
    api_key: str,
    api: GptImageEmulator,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    session_dir: Path,
    debug_logs: Everything,
) -> None:
    """A route whose key httpx refuses (it fails, is retried and dropped), then a route
    given the key with whitespace around it, through faults and a refused prompt."""
    broken = unchecked(route, f"{api_key}\n")
    pasted = with_key(route, f"  {api_key}\r\n")
    api.add_fault(Fault.server_error(502))
    api.add_fault(Fault.rate_limited(retry_after=0.2))
    prompts = [f"a keyless kestrel #{n}" for n in range(5)] + ["[reject] a refused raven"]

    state = generate_images(
        prompts, bucket=bucket, credentials=[broken, pasted], prefix="keys", return_state=True
    )

    assert state.is_failed()  # the refused prompt, after every other image is stored
    exc = state.result(raise_on_failure=False)
    assert len(exc.report.images) == 5, exc.report.failures
    written = _everything_written(state, bucket, s3_server, session_dir, debug_logs)
    for where, text in written.items():
        assert not leaked(text, api_key), f"the API key leaked into {where}"
    # httpx did quote the key, and it was masked.
    assert any("Illegal header value" in line and "***'" in line for line in debug_logs.lines)


@pytest.mark.parametrize(
    "batch", [{"enabled": False}, {"wait_minutes": 1}], ids=["sync", "batch-api"]
)
def test_a_key_a_gateway_quotes_in_its_401_is_masked_on_every_path(
    batch: dict[str, Any],
    api: GptImageEmulator,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    session_dir: Path,
    debug_logs: Everything,
) -> None:
    """A gateway that rejects a key quotes it whole: the synchronous path and the Batch API
    path cross the same boundary, so neither lets it into the error, the report, the
    manifest, the logs or what Prefect stores."""
    api.gateway, api.echo_keys = "litellm", True
    wrong_key = f"sk-gateway-rejects-{uuid.uuid4().hex}"
    route = with_key(openai_credentials, wrong_key)

    state = generate_images(
        [f"a quoted quail #{n}" for n in range(2)],
        bucket=bucket,
        credentials=route,
        batch=batch,
        return_state=True,
    )

    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, RunFailedError), exc
    assert {failure.error_type for failure in exc.report.failures} == {"AuthenticationError"}
    assert all("***" in failure.error for failure in exc.report.failures)  # quoted, masked
    written = _everything_written(state, bucket, s3_server, session_dir, debug_logs)
    for where, text in written.items():
        assert not leaked(text, wrong_key), f"the rejected key leaked into {where}"


def test_a_batch_file_line_quoting_the_key_comes_out_masked(
    api: GptImageEmulator, openai_credentials: OpenAICredentials, api_key: str
) -> None:
    """A line of a batch's error file is an answer too, read through the same boundary: a
    refusal's body and a request-not-run's message lose the key; an image is not searched."""
    batch_api = BatchApiClient(openai_credentials)
    lines = [
        {
            "custom_id": "refused",
            "response": {
                "status_code": 401,
                "body": {"error": {"message": f"Bearer {api_key} was refused", "code": "401"}},
            },
        },
        {"custom_id": "not run", "error": {"code": "failed", "message": f"{api_key} revoked"}},
    ]
    file_id = batch_api.upload([json.dumps(line).encode() + b"\n" for line in lines], "e.jsonl")

    refused, not_run = batch_api.answers(file_id)

    assert refused.body["error"]["message"] == "Bearer *** was refused"
    assert not_run.error_message == "*** revoked"


# --- scrub ---------------------------------------------------------------------------------


def test_scrub_masks_every_form_of_the_key() -> None:
    key = "sk-0123456789abcdef\n"
    text = f"Illegal header value b{key!r}; given {key}; stripped {key.strip()}."
    assert scrub(text, key) == "Illegal header value b'***'; given ***; stripped ***."
    assert scrub("nothing to hide", "") == "nothing to hide"


def test_scrub_error_keeps_type_fields_and_traceback() -> None:
    key = "sk-0123456789abcdef"
    try:
        raise ServerError(f"503 for Bearer {key}", status_code=503, retry_after=2.5)
    except ServerError as raised:
        error = raised
    error.charges = Charges(calls=2, usd=0.06)
    error.add_note(f"while sending {key}")
    error.__context__ = ValueError(f"header {key!r}")
    frames = traceback.extract_tb(error.__traceback__)

    assert scrub_error(error, key) is error
    assert str(error) == "503 for Bearer ***" and error.__notes__ == ["while sending ***"]
    assert (error.status_code, error.retry_after, error.billed, error.charges.calls) == (
        503,
        2.5,
        True,
        2,
    )
    assert error.__context__ is None and traceback.extract_tb(error.__traceback__) == frames
    assert key not in "".join(traceback.format_exception(error))


# --- Reading back what Prefect stored ------------------------------------------------------


def _everything_written(
    state: State[Any],
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    session_dir: Path,
    debug_logs: Everything,
) -> dict[str, str]:
    """What a failed flow run left behind: Prefect's records, the logs, the error,
    the report, the manifest in the bucket, and the files under Prefect's home."""
    exc = state.result(raise_on_failure=False)
    written = _what_prefect_stored(state.state_details.flow_run_id, "run")
    written["log"] = "\n".join(debug_logs.lines)
    written["error"] = "".join(traceback.format_exception(exc)) + repr(exc)
    written["state"] = f"{state!r} {state.message}"
    written["report"] = exc.report.model_dump_json()
    written["manifest"] = (
        s3_server.boto3_client()
        .get_object(Bucket=bucket.bucket_name, Key=exc.report.manifest_key)["Body"]
        .read()
        .decode()
    )
    written.update(_prefect_home(session_dir))
    return written


def _what_prefect_stored(flow_run_id: object, name: str) -> dict[str, str]:
    """The flow run, its task runs, logs and artifacts, as Prefect's API returns them."""
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
        artifacts = client.read_artifacts()
    return {
        f"{name} flow run": flow_run.model_dump_json(),
        f"{name} parameters": json.dumps(flow_run.parameters, default=str),
        f"{name} task runs": json.dumps([t.model_dump(mode="json") for t in task_runs]),
        f"{name} api logs": _api_logs(flow_run.id),
        f"{name} artifacts": json.dumps([a.model_dump(mode="json") for a in artifacts]),
    }


def _api_logs(flow_run_id: UUID, timeout: float = 15) -> str:
    """A flow run's logs as the API has them, once its last one is there: logs are sent in
    batches, after the run has returned."""
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
        text = "\n".join(log.message for log in logs)
        if "Finished in state" in text or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def _prefect_home(session_dir: Path) -> dict[str, str]:
    """Every file under Prefect's home: results (a failed task's pickled error among
    them), cache records, locks."""
    return {
        f"file {path}": path.read_bytes().decode("latin-1")
        for path in (session_dir / "prefect-home").rglob("*")
        if path.is_file()
    }
