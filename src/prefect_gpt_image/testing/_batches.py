"""OpenAI's Batches API, served by `GptImageEmulator` beside its Images and Files APIs.

The product submits large image jobs through the Batch API: it uploads a JSONL file of
requests, creates a batch, polls it, then downloads an output file and an error file. What
is worth testing lives in that lifecycle (a file refused while validating, a batch that
expires or is cancelled half done, requests refused one by one), so each batch here is a
small state machine, run by a thread of its own:

    validating -> in_progress -> finalizing -> completed
    validating -> failed                      the input file breaks the rules
    in_progress -> expired                    after `batch_expire_after` requests
    validating | in_progress -> cancelling -> cancelled

Each request line is answered by the Images route's own code for a synchronous call (the
same checks, queued faults, images and usage) without its rate limit or latency, and
recorded apart, in `batch_calls`. Its files are the Files API's (`_files`), its lines'
formats `_batch_lines`'.

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
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from prefect_gpt_image.testing._batch_lines import (
    _batch_error,
    _Line,
    _output_line,
    _Sink,
    _validate,
)
from prefect_gpt_image.testing._faults import Fault, _QueuedFault, _server_error, _take_queued
from prefect_gpt_image.testing._files import _FILE_SECONDS, _Files, _lifetime, _now, _page, _query
from prefect_gpt_image.testing._openai_common import (
    _choice,
    _invalid,
    _json_type,
    _openai_error,
    _parsed_json,
    _Part,
    _Refused,
    _request_id,
    _string,
)
from prefect_gpt_image.testing._openai_images import _OpenAiImages, _recorded
from prefect_gpt_image.testing._openai_requests import (
    _checked,
    _ImageRequest,
    _parse_openai,
    _read_edit,
)
from prefect_gpt_image.testing._records import _Records
from prefect_gpt_image.testing._server import (
    _DROPPED,
    _gateway_page,
    _json,
    _Reply,
    _with_headers,
)

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

_BATCH_FIELDS = frozenset(
    {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
)
_WINDOW_SECONDS = 24 * 3600
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


class _Settings(Protocol):
    """The emulator's settings the batches read: when a batch is created, or a file
    uploaded, or a line read."""

    models: dict[str, Sequence[str] | None]
    min_pixels: int
    batch_processing_seconds: float
    batch_expire_after: int | None
    batch_max_requests: int
    batch_max_file_bytes: int


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


class _Stopped(Exception):
    """The emulator stops or resets: a batch's thread ends without another word."""


class BatchApi:
    """The Files and Batches endpoints of one emulator, and the batches it runs.

    `images` is the emulator's Images route: it checks keys, words errors as the gateway
    does, and answers each request line; `records` take the lines' records.
    """

    def __init__(self, settings: _Settings, images: _OpenAiImages, records: _Records) -> None:
        self._settings = settings
        self._openai = images
        self._records = records
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
        reply = self._openai.gatekeep(headers)
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
        reply = self._openai.through_gateway(reply)
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
                limit = self._settings.batch_max_file_bytes
                return _json(200, self._files.upload(raw, headers.get("content-type", ""), limit))
            case "GET", "files", None, None:
                return _json(200, self._files.listing(query))
            case "GET", "files", str(file_id), None:
                return _json(200, self._files.get(file_id).describe())
            case "DELETE", "files", str(file_id), None:
                self._files.delete(file_id)
                return _json(200, {"id": file_id, "object": "file", "deleted": True})
            case "GET", "files", str(file_id), "content":
                return self._files.download(file_id)
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
        body = _parsed_json(raw)
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
        settings = self._settings
        batch = _Batch(
            f"batch_{secrets.token_hex(16)}",
            endpoint,
            file_id,
            metadata,
            project,
            _FILE_SECONDS if lifetime is None else lifetime,
            settings.batch_processing_seconds,
            settings.batch_expire_after,
            self._records.epoch,
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
        self._pause(batch, batch.seconds * _VALIDATING)
        most = self._settings.batch_max_requests
        lines, errors, model = _validate(source, batch.endpoint, most)
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
        url, body = line["url"], line["body"]
        request = self._image_request(url, body)
        kind = None
        if request is None:  # an endpoint the emulator does not serve
            request = _ImageRequest(body, None)
            reply = _openai_error(404, f"Invalid URL (POST {url})")
        else:
            kind, reply = self._openai.respond(request, latency=0.0)
        reply = self._openai.through_gateway(reply)  # an error line is an answer, in its words
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
        call = _recorded(url, request, status, kind, {})
        call = dataclasses.replace(call, batch_id=batch.id, custom_id=custom_id)
        self._records.add_batch(batch.epoch, call)
        answer = {"status_code": status, "request_id": _request_id(), "body": payload}
        return status, answer, call.usage

    # -- images in a batch's requests -------------------------------------------------------

    def _image_request(self, url: str, body: dict[str, Any]) -> _ImageRequest | None:
        """`body` read as a generation or an edit, or None for another endpoint."""
        models, min_pixels = self._settings.models, self._settings.min_pixels
        if url == _GENERATIONS:
            return _parse_openai(json.dumps(body).encode(), models, min_pixels)
        if url != _EDITS:
            return None
        # An edit's JSON form: its images come as `images` (and `mask`) references, which
        # become the uploads of the multipart form and are checked the same way.
        fields = {name: value for name, value in body.items() if name not in ("images", "mask")}

        def read(request: _ImageRequest) -> _ImageRequest:
            images = self._images(body.get("images"))
            mask = body.get("mask")
            masks = [] if mask is None else [self._image(mask, "mask")]
            return _read_edit(request, images, masks, models, min_pixels)

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
