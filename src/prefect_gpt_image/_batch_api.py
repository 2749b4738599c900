"""OpenAI's Batch API: the same image requests, sent as one file and answered within 24
hours, at half the synchronous price.

A batch is a JSON Lines file of requests, each with a `custom_id` (here, the request's
cache key), uploaded through the Files API and run with `completion_window="24h"`. Its
answers come back as another file, one line per request, in any order, each holding its
images in base64: that file is read line by line, never whole, and a line that cannot be
read is reported as such, never allowed to stop the reading of the rest. The calls go
through the official `openai` package with its retries off; those made here follow
`_retry_policy`.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError

from prefect_gpt_image._redaction import keyless, scrub, without_userinfo
from prefect_gpt_image._responses import error_for_openai_response
from prefect_gpt_image._retry_policy import BATCH_API_RETRY_DELAYS, call_with_retries, is_retryable
from prefect_gpt_image.errors import (
    APIConnectionError,
    EndpointNotFoundError,
    GptImageError,
    InvalidRequestError,
)

if TYPE_CHECKING:
    import openai

    from prefect_gpt_image._routes import OpenAIRoute


T = TypeVar("T")

logger = logging.getLogger(__name__)

GENERATIONS_ENDPOINT: Final = "/v1/images/generations"
COMPLETION_WINDOW: Final = "24h"
BATCHES_SEARCHED = 1_000
"""How many of the account's latest batches are searched for one a stopped run created."""
BATCH_METADATA = {"created_by": "prefect-gpt-image"}
_CUSTOM_ID = re.compile(r'"custom_id"\s*:\s*"([^"\\]{1,512})"')
"""A line's `custom_id`, as it reads in a line that is not whole JSON."""
_CUSTOM_ID_REACH = 4096
"""How far into a broken line its `custom_id` is looked for: it comes before the answer."""

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


class _LineResponse(BaseModel):
    status_code: int
    body: Any = None


class _LineError(BaseModel):
    code: str | None = None
    message: str | None = None


class _OutputLine(BaseModel):
    """A line of an output or error file, as the API documents it (BatchRequestOutput)."""

    custom_id: str = Field(min_length=1)
    response: _LineResponse | None = None
    error: _LineError | None = None


class UnreadableLine(BaseModel):
    """A line of an output or error file that is not an answer: not JSON, cut short, or
    without a `custom_id`."""

    number: int = Field(description="Its line number in the file, from 1.")
    reason: str
    custom_id: str | None = Field(
        default=None, description="The `custom_id` it seems to carry, where one can be read."
    )


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

    def __init__(self, route: OpenAIRoute) -> None:
        from prefect_gpt_image._client import auth_headers, openai_client

        self._route = route
        self._openai = openai_client(route)
        self._headers = auth_headers(route)
        self._key = route.api_key.get_secret_value()

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
        """Start a batch of the requests in `input_file_id`, once.

        Creating is not idempotent: an answer lost after the API acted (a proxy's 502, a
        dropped connection) may hide a batch that runs, and bills, all the same. So after
        any unclear answer the batch is looked for by its input file before another try.
        """

        def create_once() -> BatchStatus:
            try:
                return self._status(
                    self._translated(
                        lambda: self._openai.batches.create(
                            input_file_id=input_file_id,
                            endpoint=GENERATIONS_ENDPOINT,
                            completion_window=COMPLETION_WINDOW,
                            metadata=BATCH_METADATA,
                            extra_headers=self._headers,
                        )
                    )
                )
            except GptImageError as exc:
                if not is_retryable(exc):  # a clear refusal: nothing was created
                    raise
                found = self.find(input_file_id)
                if found is None:
                    raise
                logger.info(
                    "The answer to creating %s was lost; it runs as %s", input_file_id, found.id
                )
                return found

        with keyless(self._key):
            return call_with_retries(create_once, BATCH_API_RETRY_DELAYS)

    def find(self, input_file_id: str) -> BatchStatus | None:
        """The batch already started for `input_file_id`, if one was: a run stopped
        between the two calls must not start a second one."""
        for batch in self._recent_batches():
            if batch.input_file_id == input_file_id:
                return self._status(batch)
        return None

    def holding(self, custom_ids: Set[str]) -> dict[str, BatchStatus]:
        """The newest batch (of the account's latest `BATCHES_SEARCHED` this package
        created) whose input file holds each of `custom_ids`, for requests whose own record
        is lost: the API, not the record, says whether they were sent."""
        found: dict[str, BatchStatus] = {}
        for batch in self._recent_batches():
            if len(found) == len(custom_ids):
                break
            if (batch.metadata or {}).get("created_by") != BATCH_METADATA["created_by"]:
                continue
            try:
                for line in self._lines(batch.input_file_id):
                    key = json.loads(line).get("custom_id")
                    if key in custom_ids and key not in found:
                        found[key] = self._status(batch)
            except EndpointNotFoundError:  # its input file expired (after 30 days): not ours
                continue
        return found

    def _recent_batches(self) -> Iterator[openai.types.Batch]:
        """The account's latest `BATCHES_SEARCHED` batches, newest first, page by page."""
        page = self._call(lambda: self._openai.batches.list(limit=100, extra_headers=self._headers))
        return itertools.islice(page, BATCHES_SEARCHED)

    def retrieve(self, batch_id: str) -> BatchStatus:
        return self._status(
            self._call(lambda: self._openai.batches.retrieve(batch_id, extra_headers=self._headers))
        )

    def cancel(self, batch_id: str) -> BatchStatus:
        return self._status(
            self._call(lambda: self._openai.batches.cancel(batch_id, extra_headers=self._headers))
        )

    def answers(self, file_id: str) -> Iterator[BatchAnswer | UnreadableLine]:
        """The lines of an output or error file, streamed: one image's base64 at a time. A
        line that is no answer (a refusal, a request not run) is an answer from the API all
        the same, and comes out with no form of the key in it, as an error would."""
        with keyless(self._key):
            for number, line in enumerate(self._lines(file_id), start=1):
                yield self._keyless(_answer(number, line))

    def _lines(self, file_id: str) -> Iterator[str]:
        """A file's lines, streamed, blank ones left out."""
        content = self._openai.files.with_streaming_response.content
        # Entered inside the retried call: the request is sent when the stream is opened.
        response = self._call(lambda: content(file_id, extra_headers=self._headers).__enter__())
        try:
            for line in response.iter_lines():
                if line.strip():
                    yield line
        finally:
            response.close()

    def _call(self, call: Callable[[], T]) -> T:
        """`call`, with `_retry_policy`'s retries, and the API's errors in the product's
        words, read as on the synchronous path (`_responses`), and `keyless` as there."""
        with keyless(self._key):
            return call_with_retries(lambda: self._translated(call), BATCH_API_RETRY_DELAYS)

    def _status(self, batch: openai.types.Batch) -> BatchStatus:
        status = _status(batch)
        if status.errors:  # the API's own words about the file, which may quote anything
            status.errors = [scrub(error, self._key) for error in status.errors]
        return status

    def _keyless(self, answer: BatchAnswer | UnreadableLine) -> BatchAnswer | UnreadableLine:
        """`answer`, a refusal's text scrubbed of the key; an image's is not searched, and
        an unreadable line carries only its number and why."""
        if isinstance(answer, UnreadableLine) or answer.answered:
            return answer
        body = json.loads(scrub(json.dumps(answer.body), self._key))
        message = scrub(answer.error_message, self._key) if answer.error_message else None
        return answer.model_copy(update={"body": body, "error_message": message})

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


def _answer(number: int, line: str) -> BatchAnswer | UnreadableLine:
    """Line `number` of an output or error file: `{custom_id, response: {status_code,
    body}, error: {code, message}}`, or why it is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        text = line.strip()
        cut = text.startswith("{") and not text.endswith("}")
        seen = _CUSTOM_ID.search(line, 0, _CUSTOM_ID_REACH)
        reason = "cut short" if cut else "not JSON"
        return UnreadableLine(number=number, reason=reason, custom_id=seen[1] if seen else None)
    try:
        parsed = _OutputLine.model_validate(record)
    except ValidationError:
        custom_id = record.get("custom_id") if isinstance(record, dict) else None
        if not isinstance(custom_id, str) or not custom_id:
            return UnreadableLine(number=number, reason="no custom_id")
        return UnreadableLine(number=number, reason="not an answer", custom_id=custom_id)
    response, error = parsed.response, parsed.error
    return BatchAnswer(
        custom_id=parsed.custom_id,
        status_code=response.status_code if response else None,
        body=response.body if response else None,
        error_code=error.code if error else None,
        error_message=error.message if error else None,
    )
