"""The JSONL files of OpenAI's Batch API: a batch's input lines, checked as the API checks
them before it runs any, and the lines of its output and error files.

An input line is a BatchRequestInput (`custom_id`, `method`, `url`, `body`); a file with any
bad line fails the batch with one BatchError per line. An output line is a
BatchRequestOutput. Output faults (`add_batch_output_fault`) spoil lines here, as a faulty
service or a file damaged in storage would.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from prefect_gpt_image.testing._faults import Fault
from prefect_gpt_image.testing._openai_common import (
    _choice,
    _invalid,
    _json_type,
    _refusal,
    _Refused,
    _string,
)

_NOT_RUN = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}
_NOT_JSON = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


@dataclass(frozen=True)
class _Line:
    """A request line that passed validation: where it starts in the file, and its id."""

    offset: int
    custom_id: str


def _batch_error(
    code: str, message: str, param: str | None = None, line: int | None = None
) -> dict[str, Any]:
    """A BatchError object, as a failed batch lists it."""
    return {"code": code, "message": message, "param": param, "line": line}


def _validate(
    source: BinaryIO, endpoint: str, most: int
) -> tuple[list[_Line], list[dict[str, Any]], str | None]:
    """The requests of a batch's input file, the errors that fail the batch (BatchError
    objects, numbered by line) and the model of its first request."""
    lines: list[_Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    requests = offset = 0
    source.seek(0)
    for number, raw in enumerate(source, start=1):
        start, offset = offset, offset + len(raw)
        if not raw.strip():
            continue
        requests += 1
        if requests > most:
            message = (
                f"The batch input file has more than the {most} requests a batch may hold. "
                "Please try again with a smaller batch."
            )
            return [], [_batch_error("too_many_requests", message)], None
        try:
            custom_id, body = _envelope(raw, endpoint, seen)
        except _Refused as refused:
            error = json.loads(refused.reply.body)["error"]
            errors.append(_batch_error(error["code"], error["message"], error["param"], number))
            continue
        lines.append(_Line(start, custom_id))
        if model is None and isinstance(body.get("model"), str):
            model = body["model"]
    if not requests:
        message = "The batch input file is empty: it has no requests."
        errors.append(_batch_error("empty_file", message))
    return lines, errors, model


def _envelope(raw: bytes, endpoint: str, seen: set[str]) -> tuple[str, dict[str, Any]]:
    """A line's `custom_id` and `body`, checked as BatchRequestInput; raises _Refused."""
    try:
        line = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _refusal("This line is not parseable as valid JSON.", "invalid_json_line") from None
    if not isinstance(line, dict):
        raise _refusal("This line is not a JSON object.", "invalid_json_line")
    for name in ("custom_id", "method", "url", "body"):
        if line.get(name) is None:
            message = f"Missing required parameter: '{name}'."
            raise _invalid(message, name, "missing_required_parameter")
    custom_id = _string(line, "custom_id", "")
    _choice(line, "method", ("POST",))
    url = _string(line, "url", "")
    body = line["body"]
    if not isinstance(body, dict):
        message = (
            f"Invalid type for 'body': expected an object, but got {_json_type(body)} instead."
        )
        raise _invalid(message, "body", "invalid_type")
    if url != endpoint:
        message = (
            f"The URL provided for this request ('{url}') does not match the batch "
            f"endpoint ('{endpoint}')."
        )
        raise _invalid(message, "url", "invalid_url")
    if custom_id in seen:
        message = (
            "The custom_id for this request is a duplicate of another request. "
            "The custom_id parameter must be unique for each request in a batch."
        )
        raise _invalid(message, "custom_id", "duplicate_custom_id")
    seen.add(custom_id)
    return custom_id, body


def _output_line(
    custom_id: str, response: dict[str, Any] | None, not_run: str | None = None
) -> dict[str, Any]:
    """A line of an output or error file (BatchRequestOutput): an answer in `response`, or
    for a request never run, `error` with its code."""
    error = None if not_run is None else {"code": not_run, "message": _NOT_RUN[not_run]}
    return {
        "id": f"batch_req_{secrets.token_hex(16)}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


class _Sink:
    """An output or error file, written line by line as requests complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = 0
        self._handle: BinaryIO | None = None

    def write(self, line: dict[str, Any], fault: Fault | None = None) -> None:
        """Write `line`, or what the output `fault` makes of it."""
        for data in [json.dumps(line).encode()] if fault is None else _spoiled(line, fault):
            if self._handle is None:
                self._handle = self.path.open("wb")
            self._handle.write(data + b"\n")
            self.lines += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _spoiled(line: dict[str, Any], fault: Fault) -> list[bytes]:
    """The lines written instead of `line` under an output fault."""
    encoded = json.dumps(line).encode()
    if fault.kind == "not_json":
        return [_NOT_JSON]
    if fault.kind == "truncated":  # cut inside its image's base64, as by a partial write
        return [encoded[: len(encoded) // 2]]
    if fault.kind == "no_custom_id":
        return [json.dumps({k: v for k, v in line.items() if k != "custom_id"}).encode()]
    stray = {**line, "id": f"batch_req_{secrets.token_hex(16)}", "custom_id": fault.message}
    return [encoded, json.dumps(stray).encode()]
