"""OpenAI's Files and Batch APIs, served by `GptImageEmulator` beside its Images API.

The product submits large image jobs through the Batch API: it uploads a JSONL file of
requests, creates a batch, polls it, then downloads an output file and an error file. What
is worth testing lives in that lifecycle (a file refused while validating, a batch that
expires or is cancelled half done, requests refused one by one), so each batch here is a
small state machine, run by a thread of its own:

    validating -> in_progress -> finalizing -> completed
    validating -> failed                      the input file breaks the rules
    in_progress -> expired                    after `batch_expire_after` requests
    validating | in_progress -> cancelling -> cancelled

`GptImageEmulator.add_batch_output_fault` spoils the answer lines a batch writes, as a
faulty service or a file damaged in storage would: a line that is not JSON, one cut short,
one without its `custom_id`, or a stray copy of an answer that carries another request's
`custom_id`.

Each request line is answered by the emulator's own code for a synchronous call (the same
checks, queued faults, images and usage) without its rate limit or latency, and recorded
apart, in `batch_calls`. File contents live in a temporary directory that the emulator owns
and are sent in chunks, so a thousand-image output file costs disk, not memory.

Batches are scoped to the project a call names, as OpenAI scopes them. Queued faults
(`add_fault`) stand for the path between client and API: a call carried out whose answer is
lost (a proxy's 502, a dropped connection), a 404 for a batch that exists, a 5xx before the
call is carried out.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import mimetypes
import random
import re
import secrets
import shutil
import string
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import parse_qs

from prefect_gpt_image.testing.emulator import (
    _BAD_JSON,
    _DROPPED,
    _checked,
    _choice,
    _form_parts,
    _form_value,
    _gateway_page,
    _ImageRequest,
    _invalid,
    _json,
    _json_type,
    _openai_error,
    _parse_openai,
    _Part,
    _QueuedFault,
    _read_edit,
    _Refused,
    _Reply,
    _request_id,
    _server_error,
    _string,
    _take_queued,
    _with_headers,
)

if TYPE_CHECKING:
    from prefect_gpt_image.testing.emulator import Fault, GptImageEmulator

_ROUTE = re.compile(
    r"(?:/[^/]+)*?/(?P<kind>files|batches)(?:/(?P<id>[^/]+)(?:/(?P<action>[^/]+))?)?"
)
"""`.../files[/{id}[/content]]` and `.../batches[/{id}[/cancel]]` under any prefix, as the
Images API is served: `/v1/...` for OpenAI, `/openai/v1/...` for Azure OpenAI."""

_GENERATIONS = "/v1/images/generations"
_EDITS = "/v1/images/edits"
_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    _GENERATIONS,
    _EDITS,
    "/v1/videos",
)
"""What CreateBatchRequest allows; a batch for any but the two image endpoints is accepted,
and each of its requests answered as the emulator answers that path: not found."""

_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
_BATCH_FIELDS = frozenset(
    {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
)
_UPLOAD_FIELDS = frozenset({"purpose", "expires_after[anchor]", "expires_after[seconds]"})
_WINDOW_SECONDS = 24 * 3600
_FILE_SECONDS = 30 * 24 * 3600
"""Batch input and output files expire after 30 days unless told otherwise."""
_EXPIRY_RANGE = (3600, 30 * 24 * 3600)
_METADATA_PAIRS, _METADATA_KEY, _METADATA_VALUE = 16, 64, 512
_LISTED_ERRORS = 100
"""Errors a failed batch lists at most: enough to fix a file, bounded for a broken one."""

_VALIDATING, _IN_PROGRESS, _FINALIZING = 0.1, 0.8, 0.1
"""Shares of `batch_processing_seconds` each phase takes; cancelling takes a tenth too."""

_STAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
_NOT_RUN = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}
_OPERATIONS = {
    ("POST", "files", False, None): "upload",
    ("GET", "files", True, "content"): "content",
    ("POST", "batches", False, None): "create",
    ("GET", "batches", False, None): "list",
    ("GET", "batches", True, None): "retrieve",
    ("POST", "batches", True, "cancel"): "cancel",
}
"""The calls `add_batch_api_fault` can fault, by method, kind, whether an id is given, and
action."""
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)", re.DOTALL)
_ALPHANUMERIC = string.ascii_letters + string.digits
_NOT_JSON = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


def _now() -> int:
    return int(time.time())


def _file_id() -> str:
    return "file-" + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(22))


def _refusal(message: str, code: str | None = None) -> _Refused:
    return _Refused(_openai_error(400, message, code=code))


def _batch_error(
    code: str, message: str, param: str | None = None, line: int | None = None
) -> dict[str, Any]:
    """A BatchError object, as a failed batch lists it."""
    return {"code": code, "message": message, "param": param, "line": line}


# -- files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    """An uploaded or written file; its bytes are at `path`."""

    id: str
    filename: str
    purpose: str
    size: int
    created_at: int
    expires_at: int | None
    path: Path

    def describe(self) -> dict[str, Any]:
        """The File object (OpenAIFile)."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.size,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


class _Files:
    """Files by id, their bytes in a temporary directory made on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, _File] = {}
        self._directory: Path | None = None

    def scratch(self, name: str) -> Path:
        """A path in the directory for a file about to be written, then `adopt`ed."""
        with self._lock:
            if self._directory is None:
                self._directory = Path(tempfile.mkdtemp(prefix="gpt-image-emulator-files-"))
            return self._directory / f"{name}.{secrets.token_hex(8)}"

    def add(self, data: bytes, filename: str, purpose: str, lifetime: int | None) -> _File:
        path = self.scratch("upload")
        path.write_bytes(data)
        return self.adopt(path, filename, purpose, lifetime)

    def adopt(self, path: Path, filename: str, purpose: str, lifetime: int | None) -> _File:
        """Register the file written at `path`, which it then belongs to."""
        created = _now()
        file = _File(
            _file_id(),
            filename,
            purpose,
            path.stat().st_size,
            created,
            None if lifetime is None else created + lifetime,
            path,
        )
        with self._lock:
            self._files[file.id] = file
        return file

    def get(self, file_id: str) -> _File:
        """The file, or the API's 404 (raised as _Refused)."""
        with self._lock:
            file = self._files.get(file_id)
        if file is None:
            raise _Refused(_openai_error(404, f"No such File object: {file_id}", param="id"))
        return file

    def all(self) -> list[_File]:
        with self._lock:
            return list(self._files.values())

    def delete(self, file_id: str) -> None:
        file = self.get(file_id)
        with self._lock:
            self._files.pop(file_id, None)
        file.path.unlink(missing_ok=True)  # a download under way keeps its open handle

    def open(self, file_id: str) -> BinaryIO:
        file = self.get(file_id)
        try:
            return file.path.open("rb")
        except FileNotFoundError:  # deleted meanwhile
            raise _Refused(
                _openai_error(404, f"No such File object: {file_id}", param="id")
            ) from None

    def clear(self) -> None:
        """Forget every file and delete the directory; downloads under way keep their open
        handles, and the next file makes a new directory."""
        with self._lock:
            directory, self._directory, self._files = self._directory, None, {}
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


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


# -- batches --------------------------------------------------------------------------------


@dataclass
class _Batch:
    """A batch's state; its fields change under `BatchApi._lock` only."""

    id: str
    endpoint: str
    input_file_id: str
    metadata: dict[str, str] | None
    project: str | None
    """The project it belongs to (the `OpenAI-Project` header; None for the key's own): only
    calls for that project see it."""
    output_lifetime: int
    seconds: float
    expire_after: int | None
    epoch: int
    created_at: int = field(default_factory=_now)
    status: str = "validating"
    model: str | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    stamps: dict[str, int] = field(default_factory=dict)
    total: int = 0
    completed: int = 0
    failed: int = 0
    tokens: dict[str, int] = field(
        default_factory=lambda: {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    )
    cancelled: bool = False
    halted: bool = False
    wake: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def move(self, status: str) -> None:
        """Enter `status`, stamping the time it was entered (`in_progress_at`...)."""
        self.status = status
        self.stamps[f"{status}_at"] = _now()

    def describe(self) -> dict[str, Any]:
        """The Batch object."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + _WINDOW_SECONDS,
            **{stamp: self.stamps.get(stamp) for stamp in _STAMPS},
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": {
                "input_tokens": self.tokens["input_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.tokens["output_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.tokens["total_tokens"],
            },
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class _Line:
    """A request line that passed validation: where it starts in the file, and its id."""

    offset: int
    custom_id: str


class _Stopped(Exception):
    """The emulator stops or resets: a batch's thread ends without another word."""


class BatchApi:
    """The Files and Batches endpoints of one emulator, and the batches it runs."""

    def __init__(self, emulator: GptImageEmulator) -> None:
        self._emulator = emulator
        self._files = _Files()
        self._lock = threading.Lock()
        self._batches: dict[str, _Batch] = {}
        self._output_faults: list[_QueuedFault] = []
        self._api_faults: dict[str, list[_QueuedFault]] = {}
        """Faults of the Files and Batches API's calls, by operation."""

    def add_fault(self, operation: str, fault: Fault, times: int) -> None:
        if operation not in _OPERATIONS.values():
            raise ValueError(f"unknown operation {operation!r}; use one of {_OPERATIONS.values()}")
        if fault.kind not in ("answer_lost", "not_found", "server_error"):
            raise ValueError(f"{fault.kind} is not a Files or Batches API fault")
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._api_faults.setdefault(operation, []).append(_QueuedFault(fault, times, None))

    def _take_fault(self, operation: str | None) -> Fault | None:
        if operation is None:
            return None
        with self._lock:
            return _take_queued(self._api_faults.get(operation, []), None)

    # -- the emulator's side ----------------------------------------------------------------

    def add_output_fault(self, queued: _QueuedFault) -> None:
        """Queue an output fault (see `GptImageEmulator.add_batch_output_fault`): it spoils
        the answer line, in whichever file it goes to."""
        with self._lock:
            self._output_faults.append(queued)

    def _take_output_fault(self, prompt: object) -> Fault | None:
        with self._lock:
            return _take_queued(self._output_faults, prompt if isinstance(prompt, str) else None)

    def batches(self) -> list[dict[str, Any]]:
        with self._lock:
            return [batch.describe() for batch in self._batches.values()]

    def clear(self) -> None:
        """Stop every batch's thread, then forget batches and files, deleting their bytes
        (on `reset()` and `stop()`)."""
        with self._lock:
            batches, self._batches = list(self._batches.values()), {}
            self._output_faults, self._api_faults = [], {}
            for batch in batches:
                batch.halted = True
                batch.wake.set()
        for batch in batches:
            if batch.thread is not None:
                batch.thread.join(timeout=5)
        self._files.clear()

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], raw: bytes, query: str
    ) -> _Reply | None:
        """The answer to a request for `path`, or None if it is not a Files or Batches path."""
        route = _ROUTE.fullmatch(path)
        if route is None:
            return None
        reply = self._emulator._openai_gatekeep(headers)
        if reply is None:
            operation = _OPERATIONS.get(
                (method, route["kind"], route["id"] is not None, route["action"])
            )
            fault = self._take_fault(operation)
            if fault is not None and fault.kind == "server_error":
                reply = _server_error(fault.status or 503)
            elif fault is not None and fault.kind == "not_found":
                what = "File object" if route["kind"] == "files" else "batch found with id"
                reply = _openai_error(404, f"No {what} '{route['id']}'.")
            else:
                try:
                    reply = self._dispatch(method, path, route, headers, raw, _query(query))
                except _Refused as refused:
                    reply = refused.reply
                if fault is not None:  # answer_lost: carried out, and the answer never arrives
                    if reply.stream is not None:
                        reply.stream.close()
                    return _DROPPED if fault.status is None else _gateway_page(fault.status)
        reply = self._emulator._through_gateway(reply)
        return _with_headers(reply, (("x-request-id", _request_id()),))

    def _dispatch(
        self,
        method: str,
        path: str,
        route: re.Match[str],
        headers: Mapping[str, str],
        raw: bytes,
        query: dict[str, str],
    ) -> _Reply:
        match method, route["kind"], route["id"], route["action"]:
            case "POST", "files", None, None:
                return self._upload(raw, headers.get("content-type", ""))
            case "GET", "files", None, None:
                files = [file.describe() for file in self._files.all()]
                if "purpose" in query:
                    files = [file for file in files if file["purpose"] == query["purpose"]]
                if _choice(query, "order", ("asc", "desc"), "desc") == "desc":
                    files.reverse()
                return _json(200, _page(files, query, 10_000, 10_000))
            case "GET", "files", str(file_id), None:
                return _json(200, self._files.get(file_id).describe())
            case "DELETE", "files", str(file_id), None:
                self._files.delete(file_id)
                return _json(200, {"id": file_id, "object": "file", "deleted": True})
            case "GET", "files", str(file_id), "content":
                name = self._files.get(file_id).filename.replace('"', "")
                disposition = ("content-disposition", f'attachment; filename="{name}"')
                stream = self._files.open(file_id)
                return _Reply(200, b"", "application/octet-stream", (disposition,), stream)
            case "POST", "batches", None, None:
                return _json(200, self._create(raw, _project(headers)))
            case "GET", "batches", None, None:
                project = _project(headers)
                with self._lock:
                    batches = [
                        batch.describe()
                        for batch in reversed(self._batches.values())
                        if batch.project == project
                    ]
                return _json(200, _page(batches, query, 100, 20))
            case "GET", "batches", str(batch_id), None:
                with self._lock:
                    return _json(200, self._batch(batch_id, _project(headers)).describe())
            case "POST", "batches", str(batch_id), "cancel":
                return self._cancel(batch_id, _project(headers))
        raise _Refused(_openai_error(404, f"Invalid URL ({method} {path})"))

    # -- files ------------------------------------------------------------------------------

    def _upload(self, raw: bytes, content_type: str) -> _Reply:
        """`POST .../files`: a multipart form with `file` and `purpose`."""
        parts = _form_parts(raw, content_type)
        uploads = [part for part in parts if part.name == "file"]
        fields = {part.name: _form_value(part) for part in parts if part.name != "file"}
        for name in fields:
            if name not in _UPLOAD_FIELDS:
                raise _invalid(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
        for name, present in (("file", bool(uploads)), ("purpose", "purpose" in fields)):
            if not present:
                message = f"Missing required parameter: '{name}'."
                raise _invalid(message, name, "missing_required_parameter")
        if len(uploads) > 1:
            raise _invalid("Invalid 'file': expected one file, but got several.", "file")
        purpose = _choice(fields, "purpose", _PURPOSES)
        upload = uploads[0]
        filename = upload.filename or "upload"
        expiry = None
        if any(name.startswith("expires_after[") for name in fields):
            expiry = {
                "anchor": fields.get("expires_after[anchor]"),
                "seconds": fields.get("expires_after[seconds]"),
            }
        lifetime = _lifetime(expiry, "expires_after")
        if purpose == "batch":
            if not filename.endswith(".jsonl"):
                raise _invalid(
                    "Invalid file format for Batch API. Must be .jsonl",
                    "file",
                    "invalid_file_format",
                )
            limit = self._emulator.batch_max_file_bytes
            if len(upload.data) > limit:
                message = (
                    f"The batch input file is larger than the {limit} bytes maximum. "
                    "Please try again with a smaller batch."
                )
                raise _invalid(message, "file", "file_too_large")
            lifetime = _FILE_SECONDS if lifetime is None else lifetime
        return _json(200, self._files.add(upload.data, filename, purpose, lifetime).describe())

    # -- batches ----------------------------------------------------------------------------

    def _batch(self, batch_id: str, project: str | None) -> _Batch:
        """The batch (call with the lock held), or the API's 404 (raised as _Refused), as
        for a batch of another project."""
        batch = self._batches.get(batch_id)
        if batch is None or batch.project != project:
            raise _Refused(_openai_error(404, f"No batch found with id '{batch_id}'."))
        return batch

    def _create(self, raw: bytes, project: str | None) -> dict[str, Any]:
        """`POST .../batches`: checks the request as the API does, then starts the batch."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _Refused(_openai_error(400, _BAD_JSON)) from None
        if not isinstance(body, dict):
            raise _refusal(f"Expected a JSON object, but got {_json_type(body)}.")
        for name in body:
            if name not in _BATCH_FIELDS:
                raise _invalid(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if body.get(name) is None:
                message = f"Missing required parameter: '{name}'."
                raise _invalid(message, name, "missing_required_parameter")
        file_id = _string(body, "input_file_id", "")
        endpoint = _choice(body, "endpoint", _ENDPOINTS)
        _choice(body, "completion_window", ("24h",))
        metadata = _metadata(body.get("metadata"))
        lifetime = _lifetime(body.get("output_expires_after"), "output_expires_after")
        file = self._files.get(file_id)
        if file.purpose != "batch":
            message = (
                f"Invalid 'input_file_id': {file_id} was uploaded with purpose "
                f"'{file.purpose}'; a batch's input file must have purpose 'batch'."
            )
            raise _invalid(message, "input_file_id")
        source = self._files.open(file_id)  # open now: deleting the file later does not hurt
        emulator = self._emulator
        with emulator._lock:
            epoch = emulator._epoch
        batch = _Batch(
            f"batch_{secrets.token_hex(16)}",
            endpoint,
            file_id,
            metadata,
            project,
            _FILE_SECONDS if lifetime is None else lifetime,
            emulator.batch_processing_seconds,
            emulator.batch_expire_after,
            epoch,
        )
        batch.thread = threading.Thread(
            target=self._run, args=(batch, source), name=batch.id, daemon=True
        )
        with self._lock:  # started under the lock, so that `clear()` may join it
            self._batches[batch.id] = batch
            batch.thread.start()
            return batch.describe()

    def _cancel(self, batch_id: str, project: str | None) -> _Reply:
        """`POST .../batches/{id}/cancel`: stop after the request under way, if not done."""
        with self._lock:
            batch = self._batch(batch_id, project)
            if batch.status in ("validating", "in_progress"):
                batch.cancelled = True
                batch.move("cancelling")
                batch.wake.set()
            elif batch.status not in ("cancelling", "cancelled"):
                message = f"Cannot cancel a batch with status '{batch.status}'."
                return _openai_error(409, message)
            return _json(200, batch.describe())

    # -- a batch's thread -------------------------------------------------------------------

    def _run(self, batch: _Batch, source: BinaryIO) -> None:
        """Take `batch` from `validating` to its end; a crash fails it, loudly."""
        try:
            with source:
                self._work(batch, source)
        except _Stopped:
            pass
        except Exception:
            with self._lock:
                if batch.halted:
                    return
                message = "The emulator failed while running this batch."
                batch.errors = [_batch_error("server_error", message)]
                batch.move("failed")
            raise

    def _pause(self, batch: _Batch, seconds: float) -> None:
        """Wait `seconds`, less if the batch is cancelled; raises _Stopped on a halt."""
        if seconds > 0:
            batch.wake.wait(seconds)
        with self._lock:
            if batch.halted:
                raise _Stopped

    def _work(self, batch: _Batch, source: BinaryIO) -> None:
        emulator = self._emulator
        self._pause(batch, batch.seconds * _VALIDATING)
        lines, errors, model = _validate(source, batch.endpoint, emulator.batch_max_requests)
        with self._lock:
            if batch.halted:
                raise _Stopped
            if batch.cancelled:
                lines = []
            elif errors:
                batch.errors = errors[:_LISTED_ERRORS]
                batch.move("failed")
                return
            else:
                batch.total, batch.model = len(lines), model
                batch.move("in_progress")
        random.shuffle(lines)  # the API warns that output lines come in any order
        output = _Sink(self._files.scratch(f"{batch.id}-output"))
        failures = _Sink(self._files.scratch(f"{batch.id}-error"))
        try:
            done = self._process(batch, source, lines, output, failures)
            with self._lock:
                if batch.halted:
                    raise _Stopped
                if batch.cancelled:
                    ending = "cancelled"
                    batch.wake.clear()  # the cancel woke it: hold `cancelling` a while
                elif done < len(lines):
                    ending = "expired"
                else:
                    ending = "completed"
                    batch.move("finalizing")
            for line in lines[done:]:  # requests never run, as the API reports them
                failures.write(_output_line(line.custom_id, None, f"batch_{ending}"))
            if ending != "expired":
                self._pause(batch, batch.seconds * _FINALIZING)
        finally:
            output.close()
            failures.close()
        output_file = self._publish(batch, output, "output")
        error_file = self._publish(batch, failures, "error")
        with self._lock:
            if batch.halted:
                raise _Stopped
            batch.output_file_id, batch.error_file_id = output_file, error_file
            batch.move(ending)

    def _process(
        self,
        batch: _Batch,
        source: BinaryIO,
        lines: list[_Line],
        output: _Sink,
        failures: _Sink,
    ) -> int:
        """Answer `lines` in turn, spread over the batch's time, until a cancel or expiry;
        returns how many were answered."""
        started = time.monotonic()
        span = batch.seconds * _IN_PROGRESS
        for done, line in enumerate(lines):
            with self._lock:
                if batch.halted:
                    raise _Stopped
                if batch.cancelled or (
                    batch.expire_after is not None and done >= batch.expire_after
                ):
                    return done
            source.seek(line.offset)
            request = json.loads(source.readline())
            status, answer, usage = self._answer(batch, line.custom_id, request)
            fault = self._take_output_fault((request.get("body") or {}).get("prompt"))
            (output if status == 200 else failures).write(
                _output_line(line.custom_id, answer), fault
            )
            with self._lock:
                if status == 200:
                    batch.completed += 1
                    for name in batch.tokens:
                        batch.tokens[name] += (usage or {}).get(name, 0)
                else:
                    batch.failed += 1
            left = started + span * (done + 1) / len(lines) - time.monotonic()
            self._pause(batch, left)
        return len(lines)

    def _publish(self, batch: _Batch, sink: _Sink, kind: str) -> str | None:
        """The id of the file `sink` wrote, now downloadable, or None if it has no lines."""
        if not sink.lines:
            return None
        name = f"{batch.id}_{kind}.jsonl"
        return self._files.adopt(sink.path, name, "batch_output", batch.output_lifetime).id

    def _answer(
        self, batch: _Batch, custom_id: str, line: dict[str, Any]
    ) -> tuple[int, dict[str, Any], dict[str, Any] | None]:
        """A request line answered as the synchronous endpoint answers it, and recorded:
        its status, the `response` of its output line, and its usage if billed."""
        emulator = self._emulator
        url, body = line["url"], line["body"]
        request = self._image_request(url, body)
        kind = None
        if request is None:  # an endpoint the emulator does not serve
            request = _ImageRequest(body, None)
            reply = _openai_error(404, f"Invalid URL (POST {url})")
        else:
            kind, reply = emulator._respond_openai(request, latency=0.0)
        reply = emulator._through_gateway(reply)  # an error line is an answer, in its words
        try:
            payload = json.loads(reply.body)
        except (ValueError, UnicodeDecodeError):
            payload = None
        status = reply.status
        if not isinstance(payload, dict):  # a gateway's HTML page, a body cut in transit
            status = max(status, 500)
            message = "The server had an error while processing your request. Sorry about that!"
            payload = json.loads(
                _openai_error(status, message, kind="server_error", code="server_error").body
            )
        call = emulator._openai_call(url, request, status, kind, {})
        call = dataclasses.replace(call, batch_id=batch.id, custom_id=custom_id)
        emulator._record_batch(batch.epoch, call)
        answer = {"status_code": status, "request_id": _request_id(), "body": payload}
        return status, answer, call.usage

    # -- images in a batch's requests -------------------------------------------------------

    def _image_request(self, url: str, body: dict[str, Any]) -> _ImageRequest | None:
        """`body` read as a generation or an edit, or None for another endpoint."""
        models = self._emulator.models
        if url == _GENERATIONS:
            return _parse_openai(json.dumps(body).encode(), models, self._emulator.min_pixels)
        if url != _EDITS:
            return None
        # An edit's JSON form: its images come as `images` (and `mask`) references, which
        # become the uploads of the multipart form and are checked the same way.
        fields = {name: value for name, value in body.items() if name not in ("images", "mask")}

        def read(request: _ImageRequest) -> _ImageRequest:
            images = self._images(body.get("images"))
            mask = body.get("mask")
            masks = [] if mask is None else [self._image(mask, "mask")]
            return _read_edit(request, images, masks, models, self._emulator.min_pixels)

        return _checked(fields, read)

    def _images(self, value: object) -> list[_Part]:
        if value is None:
            message = "Missing required parameter: 'images'."
            raise _invalid(message, "images", "missing_required_parameter")
        if not isinstance(value, list):
            message = f"Invalid type for 'images': expected an array, but got {_json_type(value)}."
            raise _invalid(message, "images", "invalid_type")
        if not value:
            message = (
                "Invalid 'images': empty array. Expected an array with minimum length 1, "
                "but got an empty array instead."
            )
            raise _invalid(message, "images", "empty_array")
        return [self._image(item, f"images[{index}]") for index, item in enumerate(value)]

    def _image(self, reference: object, param: str) -> _Part:
        """The image an ImageRefParam points at: a base64 data URL, or an uploaded file.
        The emulator cannot fetch URLs from the internet."""
        pairs = list(reference.items()) if isinstance(reference, dict) else []
        name, value = pairs[0] if len(pairs) == 1 else (None, None)
        if name not in ("image_url", "file_id") or not isinstance(value, str):
            message = f"Invalid '{param}': expected an object with either 'image_url' or 'file_id'."
            raise _invalid(message, param)
        if name == "file_id":
            try:
                file = self._files.get(value)
                data = file.path.read_bytes()
            except (_Refused, OSError):
                raise _invalid(f"Invalid '{param}': no such file: '{value}'.", param) from None
            media_type, _ = mimetypes.guess_type(file.filename)
            return _Part("image", file.filename, media_type, data)
        match = _DATA_URL.fullmatch(value)
        if match is None:
            message = (
                f"Invalid '{param}': the emulator reads images from base64 data URLs "
                "('data:image/png;base64,...') and file ids, not from the internet."
            )
            raise _invalid(message, param)
        try:
            data = base64.b64decode(match["data"], validate=True)
        except binascii.Error:
            raise _invalid(f"Invalid '{param}': its data URL is not valid base64.", param) from None
        return _Part("image", "image", match["type"], data)


# -- helpers --------------------------------------------------------------------------------


def _project(headers: Mapping[str, str]) -> str | None:
    """The project a call is for: its `OpenAI-Project` header, or None for the key's own."""
    return headers.get("openai-project") or None


def _query(query: str) -> dict[str, str]:
    return {name: values[-1] for name, values in parse_qs(query).items()}


def _page(
    items: list[dict[str, Any]], query: dict[str, str], most: int, default: int
) -> dict[str, Any]:
    """One page of `items` (already in the list's order) from `after`, as the API pages."""
    text = query.get("limit", str(default))
    if not text.lstrip("-").isdigit():
        message = f"Invalid 'limit': expected an integer, but got '{text}' instead."
        raise _invalid(message, "limit", "invalid_type")
    limit = int(text)
    if not 1 <= limit <= most:
        message = f"Invalid 'limit': expected an integer from 1 to {most}, but got {limit}."
        raise _invalid(message, "limit")
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


def _metadata(value: object) -> dict[str, str] | None:
    """`metadata` checked: at most 16 string pairs, keys to 64 and values to 512 characters."""
    if value is None:
        return None
    if not isinstance(value, dict):
        message = f"Invalid type for 'metadata': expected an object, but got {_json_type(value)}."
        raise _invalid(message, "metadata", "invalid_type")
    if len(value) > _METADATA_PAIRS:
        message = f"Invalid 'metadata': at most {_METADATA_PAIRS} pairs, but got {len(value)}."
        raise _invalid(message, "metadata")
    for key, text in value.items():
        if not isinstance(text, str):
            message = f"Invalid type for 'metadata.{key}': expected a string."
            raise _invalid(message, "metadata", "invalid_type")
        if len(key) > _METADATA_KEY or len(text) > _METADATA_VALUE:
            message = (
                f"Invalid 'metadata': keys may have at most {_METADATA_KEY} characters "
                f"and values at most {_METADATA_VALUE}."
            )
            raise _invalid(message, "metadata", "string_above_max_length")
    return {str(key): str(text) for key, text in value.items()}


def _lifetime(value: object, param: str) -> int | None:
    """Seconds from an `expires_after` policy (`anchor` "created_at", `seconds` within
    an hour to 30 days), or None if none was given."""
    if value is None:
        return None
    if not isinstance(value, dict):
        message = f"Invalid type for '{param}': expected an object, but got {_json_type(value)}."
        raise _invalid(message, param, "invalid_type")
    _choice(value, "anchor", ("created_at",), default="")
    seconds = value.get("seconds")
    if isinstance(seconds, str) and seconds.isdigit():  # a form field
        seconds = int(seconds)
    low, high = _EXPIRY_RANGE
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not low <= seconds <= high:
        message = f"Invalid '{param}.seconds': expected an integer from {low} to {high}."
        raise _invalid(message, f"{param}.seconds")
    return seconds


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
