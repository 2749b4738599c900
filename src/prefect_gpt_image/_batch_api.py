"""OpenAI's Batch API: the same image requests, sent as one file and answered within 24
hours, at half the synchronous price.

A batch is a JSON Lines file of requests, each with a `custom_id` (here, the request's
cache key), uploaded through the Files API and run with `completion_window="24h"`. Its
answers come back as another file, one line per request, in any order, each holding its
images in base64: that file is read line by line, never whole. The calls go through the
official `openai` package with its retries off; those made here follow `_retry_policy`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from pydantic import BaseModel, Field

from prefect_gpt_image._redaction import without_userinfo
from prefect_gpt_image._responses import error_for_openai_response
from prefect_gpt_image._retry_policy import BATCH_API_RETRY_DELAYS, call_with_retries
from prefect_gpt_image.errors import APIConnectionError, InvalidRequestError

if TYPE_CHECKING:
    import openai

    from prefect_gpt_image.blocks.openai_credentials import OpenAICredentials

T = TypeVar("T")

GENERATIONS_ENDPOINT: Final = "/v1/images/generations"
COMPLETION_WINDOW: Final = "24h"
BATCHES_SEARCHED = 1_000
"""How many of the account's latest batches are searched for one a stopped run created."""
BATCH_METADATA = {"created_by": "prefect-gpt-image"}

BatchState = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
ENDED: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})
"""States a batch never leaves: what it answered is all it will answer."""


class BatchStatus(BaseModel):
    """Where a batch stands, as the Batches API reports it."""

    id: str
    status: BatchState
    input_file_id: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = Field(default=0, description="Requests in the batch.")
    completed: int = Field(default=0, description="Requests answered.")
    failed: int = Field(default=0, description="Requests refused or failed.")
    errors: list[str] = Field(
        default_factory=list, description="Why the file itself was refused, if it was."
    )

    @property
    def ended(self) -> bool:
        return self.status in ENDED


class BatchAnswer(BaseModel):
    """One line of an output or error file: a request's answer, or why it has none."""

    custom_id: str
    status_code: int | None = Field(default=None, description="The answer's HTTP status.")
    body: Any = Field(default=None, description="The answer's body, as the API sent it.")
    error_code: str | None = Field(default=None, description="Why there is no answer.")
    error_message: str | None = None

    @property
    def answered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def request_line(custom_id: str, body: Mapping[str, Any]) -> bytes:
    """One request of a batch's input file."""
    line = {"custom_id": custom_id, "method": "POST", "url": GENERATIONS_ENDPOINT, "body": body}
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def split_lines(lines: Sequence[bytes], max_requests: int, max_file_bytes: int) -> list[int]:
    """Where to cut `lines` into input files within the API's limits: each file's end."""
    ends: list[int] = []
    count = size = 0
    for index, line in enumerate(lines):
        if len(line) > max_file_bytes:
            raise InvalidRequestError(
                f"One request takes {len(line):,} bytes, over batch_max_file_bytes "
                f"({max_file_bytes:,}): it cannot be sent in a batch."
            )
        if count == max_requests or size + len(line) > max_file_bytes:
            ends.append(index)
            count = size = 0
        count += 1
        size += len(line)
    if count:
        ends.append(len(lines))
    return ends


class BatchApiClient:
    """The Files and Batches APIs of one OpenAI-protocol route."""

    def __init__(self, route: OpenAICredentials) -> None:
        from prefect_gpt_image._client import auth_headers, openai_client

        self._route = route
        self._openai = openai_client(route)
        self._headers = auth_headers(route)

    def upload(self, lines: Sequence[bytes], name: str) -> str:
        """Upload an input file; returns its id."""
        content = b"".join(lines)
        uploaded = self._call(
            lambda: self._openai.files.create(
                file=(name, content, "application/jsonl"),
                purpose="batch",
                extra_headers=self._headers,
            )
        )
        return uploaded.id

    def create(self, input_file_id: str) -> BatchStatus:
        """Start a batch of the requests in `input_file_id`."""
        return _status(
            self._call(
                lambda: self._openai.batches.create(
                    input_file_id=input_file_id,
                    endpoint=GENERATIONS_ENDPOINT,
                    completion_window=COMPLETION_WINDOW,
                    metadata=BATCH_METADATA,
                    extra_headers=self._headers,
                )
            )
        )

    def find(self, input_file_id: str) -> BatchStatus | None:
        """The batch already started for `input_file_id`, if one was: a run stopped
        between the two calls must not start a second one."""
        page = self._call(lambda: self._openai.batches.list(limit=100, extra_headers=self._headers))
        for batch in itertools.islice(page, BATCHES_SEARCHED):  # newest first, page by page
            if batch.input_file_id == input_file_id:
                return _status(batch)
        return None

    def retrieve(self, batch_id: str) -> BatchStatus:
        return _status(
            self._call(lambda: self._openai.batches.retrieve(batch_id, extra_headers=self._headers))
        )

    def cancel(self, batch_id: str) -> BatchStatus:
        return _status(
            self._call(lambda: self._openai.batches.cancel(batch_id, extra_headers=self._headers))
        )

    def answers(self, file_id: str) -> Iterator[BatchAnswer]:
        """The lines of an output or error file, streamed: one image's base64 at a time."""
        content = self._openai.files.with_streaming_response.content
        # Entered inside the retried call: the request is sent when the stream is opened.
        response = self._call(lambda: content(file_id, extra_headers=self._headers).__enter__())
        try:
            for line in response.iter_lines():
                if line.strip():
                    yield _answer(line)
        finally:
            response.close()

    def _call(self, call: Callable[[], T]) -> T:
        """`call`, with `_retry_policy`'s retries, and the API's errors in the product's
        words (a key, quota or rate-limit problem reads as on the synchronous path)."""
        return call_with_retries(lambda: self._translated(call), BATCH_API_RETRY_DELAYS)

    def _translated(self, call: Callable[[], T]) -> T:
        import openai

        try:
            return call()
        except openai.APIStatusError as exc:
            answer = exc.response
            raise error_for_openai_response(
                answer.status_code, answer.headers, answer.content, self._route.model
            ) from None
        except openai.APIConnectionError as exc:
            raise APIConnectionError(
                f"Could not reach {without_userinfo(self._route.base_url)}: {exc.__cause__ or exc}"
            ) from None


def _status(batch: openai.types.Batch) -> BatchStatus:
    counts = batch.request_counts
    errors = batch.errors.data if batch.errors is not None and batch.errors.data else []
    return BatchStatus(
        id=batch.id,
        status=batch.status,
        input_file_id=batch.input_file_id,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        total=counts.total if counts else 0,
        completed=counts.completed if counts else 0,
        failed=counts.failed if counts else 0,
        errors=[_line_error(error.line, error.code, error.message) for error in errors],
    )


def _line_error(line: int | None, code: str | None, message: str | None) -> str:
    where = f"line {line}: " if line is not None else ""
    return f"{where}{message or code or 'refused'}"


def _answer(line: str) -> BatchAnswer:
    """A line of an output or error file: `{custom_id, response: {status_code, body},
    error: {code, message}}`."""
    record = json.loads(line)
    response = record.get("response") or {}
    error = record.get("error") or {}
    return BatchAnswer(
        custom_id=record["custom_id"],
        status_code=response.get("status_code"),
        body=response.get("body"),
        error_code=error.get("code"),
        error_message=error.get("message"),
    )
