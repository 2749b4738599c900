"""The API key appears nowhere: logs at DEBUG, errors, stored parameters, results, manifest."""

from __future__ import annotations

import json
import logging
import os
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect_aws import S3Bucket
from pydantic import SecretStr

from prefect_gpt_image import RapidAPICredentials, generate_images
from prefect_gpt_image.testing import Fault, GptImageEmulator, LocalS3Server

LOGGERS = ("", "prefect", "prefect_gpt_image", "httpx", "httpcore", "botocore", "urllib3")


class Everything(logging.Handler):
    """Keeps every record, formatted with its traceback, at every level."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
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


def test_key_appears_nowhere(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    session_dir: Path,
    debug_logs: Everything,
) -> None:
    key = credentials.api_key.get_secret_value()
    wrong_key = "wrong-key-4c1d8e2f9a7b"
    api.add_fault(Fault.rate_limited(retry_after=0.5))
    api.add_fault(Fault.server_error(502))
    api.add_fault(Fault.stall(0.2))
    api.add_fault(Fault.malformed_body())
    prompts = ["a secret-free swan", "a secret-free stork", "[reject] a refused raven"]

    state = generate_images(
        prompts, bucket=bucket, credentials=credentials, prefix="leaks", return_state=True
    )
    wrong = credentials.model_copy(update={"api_key": SecretStr(wrong_key), "model": "other"})
    wrong_state = generate_images(
        ["a rejected-key robin"], bucket=bucket, credentials=wrong, return_state=True
    )

    assert state.is_failed() and wrong_state.is_failed()
    assert api.billed == 3  # the run went on: two images, and one answer lost to a fault
    assert any("AuthenticationError" in line for line in debug_logs.lines)

    written: dict[str, str] = {"log": "\n".join(debug_logs.lines)}
    for name, flow_state in (("run", state), ("wrong", wrong_state)):
        exc = flow_state.result(raise_on_failure=False)
        written[f"{name} error"] = "".join(traceback.format_exception(exc)) + repr(exc)
        written[f"{name} state"] = f"{flow_state!r} {flow_state.message}"
        written.update(_what_prefect_stored(flow_state.state_details.flow_run_id, name))
        for failure in exc.report.failures:
            written[f"{name} failure {failure.prompt}"] = failure.model_dump_json()
        written[f"{name} manifest"] = (
            s3_server.boto3_client()
            .get_object(Bucket=bucket.bucket_name, Key=exc.report.manifest_key)["Body"]
            .read()
            .decode()
        )
    for path in (session_dir / "prefect-home").rglob("*"):  # results, cache keys, locks
        if path.is_file():
            written[f"file {path}"] = str(path) + path.read_bytes().decode("latin-1")

    assert len(written) > 10
    for where, text in written.items():
        assert key not in text, f"the API key leaked into {where}"
        assert wrong_key not in text, f"the rejected API key leaked into {where}"


def _what_prefect_stored(flow_run_id: object, name: str) -> dict[str, str]:
    """The flow run, its task runs, logs and artifacts, as Prefect's API returns them."""
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))
        )
        artifacts = client.read_artifacts()
    assert flow_run.parameters["credentials"]  # stored, in some form
    return {
        f"{name} flow run": flow_run.model_dump_json(),
        f"{name} parameters": json.dumps(flow_run.parameters, default=str),
        f"{name} task runs": json.dumps([t.model_dump(mode="json") for t in task_runs]),
        f"{name} api logs": "\n".join(log.message for log in logs),
        f"{name} artifacts": json.dumps([a.model_dump(mode="json") for a in artifacts]),
        f"{name} env": json.dumps({k: v for k, v in os.environ.items() if "PREFECT" in k}),
    }
