"""A run's requests on OpenAI's Batch API: which are in a batch already, sending the rest,
and reading each batch's answers once it ends.

Every request sent is recorded under its cache key (a `BatchPointer`, kept where the
generation cache is) before its batch is created and again after, so that a run stopped
at any point and started again finds its batches instead of paying for new ones. Once a
batch ends, its images go to the cache like any other, so that the cache, not the
pointer, answers for them next time. A line of its output is taken only for a request that
batch was sent; a line that cannot be read fails its request (where it can be told) and
no other. A request the API refused is an answer too: the refusal is kept in its pointer,
and the request is not sent again until it changes (a new cache key) or `refresh_cache`
asks. A request the batch did not answer otherwise is marked settled, and the next run
sends it again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prefect.results import ResultStore
from pydantic import BaseModel, Field

from prefect_gpt_image import errors as error_types
from prefect_gpt_image._batch_api import (
    BatchAnswer,
    BatchApiClient,
    BatchStatus,
    UnreadableLine,
    request_line,
    split_lines,
)
from prefect_gpt_image._request_bodies import openai_body
from prefect_gpt_image._responses import error_for_openai_response
from prefect_gpt_image.errors import (
    APIError,
    BadRequestError,
    BatchNotDoneError,
    EndpointNotFoundError,
    GptImageError,
    InvalidResponseError,
)
from prefect_gpt_image.models import GeneratedImage, ImageRequest

if TYPE_CHECKING:
    from prefect_gpt_image.blocks.openai_credentials import OpenAICredentials

logger = logging.getLogger(__name__)

POLL_DELAYS = (1.0, 2.0, 5.0, 10.0, 20.0)
"""Waits between looks at a run's batches: quick at first (a small batch may end in
seconds), then every `POLL_EVERY_SECONDS`."""
POLL_EVERY_SECONDS = 30.0
LISTED_BATCH_ERRORS = 5
POINTER_WRITERS = 8
NOT_RUN = frozenset({"batch_expired", "batch_cancelled"})
"""Why a batch lists a request it never ran, and so never charged for."""


class Refusal(BaseModel):
    """The API's refusal of a request in a batch: its answer, kept so that the request is
    not paid for again while it stays the same."""

    error_type: str = Field(description="The error's class, in `prefect_gpt_image.errors`.")
    message: str
    status_code: int
    batch_id: str

    def error(self) -> GptImageError:
        """The error the refusal was read as, saying it is not sent again."""
        kind = getattr(error_types, self.error_type, None)
        if not (isinstance(kind, type) and issubclass(kind, APIError)):
            kind = BadRequestError
        if kind.__init__ is not APIError.__init__:  # one that takes other fields
            kind = BadRequestError
        return kind(
            f"{self.message} (Refused in batch {self.batch_id}: it is not sent again until "
            "the request changes, or refresh_cache=True.)",
            status_code=self.status_code,
        )


class BatchPointer(BaseModel):
    """Where a request was sent: its input file, then its batch."""

    request: ImageRequest = Field(
        description="The request, so that its image is kept even by a run that did not ask for it."
    )
    input_file_id: str
    batch_id: str | None = Field(
        default=None, description="None between the file's upload and the batch's creation."
    )
    settled: bool = Field(
        default=False, description="The batch ended without answering it: send it again."
    )
    refusal: Refusal | None = Field(
        default=None, description="The API refused it: do not send it again."
    )


def pointer_key(cache_key: str) -> str:
    return f"{cache_key}-batch"


def sending_lock_key(route: OpenAICredentials) -> str:
    """The lock a run holds while it finds and sends its batches through `route`."""
    identity = json.dumps(route.cache_identity(), sort_keys=True).encode()
    return "gpt-image-batches-" + hashlib.sha256(identity).hexdigest()[:32]


@dataclass(frozen=True)
class Collected:
    """A request's image, read from its batch's output. `asked` is False for a request of
    an earlier run's batch that this run did not ask for: it is paid for, so it is cached
    all the same."""

    key: str
    image: GeneratedImage
    asked: bool = True


@dataclass(frozen=True)
class Unanswered:
    """A request its batch refused, failed, or ended without."""

    key: str
    error: GptImageError


@dataclass(frozen=True)
class Waiting:
    """A request whose batch is still running when the run stops waiting for it."""

    key: str
    batch_id: str


@dataclass(frozen=True)
class Progress:
    """Requests answered so far in the batches still running."""

    completed: int


BatchEvent = Collected | Unanswered | Waiting | Progress

ReadImage = Callable[[object, ImageRequest], GeneratedImage]
"""Reads an answer's body into a checked image priced at the batch price."""


class BatchJobs:
    """The batches that answer `requests` (by cache key) through one route."""

    def __init__(
        self,
        route: OpenAICredentials,
        store: ResultStore,
        requests: Mapping[str, ImageRequest],
        read_image: ReadImage,
    ) -> None:
        self._route = route
        self._api = BatchApiClient(route)
        self._store = store
        self._requests = dict(requests)
        self._read_image = read_image
        self._batches: dict[str, list[str]] = {}
        """Batch id -> the keys of this run it answers."""
        self._batch_of: dict[str, str] = {}
        self._refused: dict[str, GptImageError] = {}
        """The requests the API refused in an earlier batch: not sent again."""
        self.created: list[str] = []
        """The batches this run created."""

    @property
    def keys(self) -> list[str]:
        return list(self._requests)

    @property
    def batch_ids(self) -> list[str]:
        return list(self._batches)

    def batch_of(self, key: str) -> str | None:
        """The batch that answers `key`, if it is in one."""
        return self._batch_of.get(key)

    def _add(self, batch_id: str, keys: Sequence[str]) -> None:
        self._batches.setdefault(batch_id, []).extend(keys)
        self._batch_of.update(dict.fromkeys(keys, batch_id))

    # --- plan ------------------------------------------------------------------------------

    def attach(self, *, create: bool = True) -> list[str]:
        """Find the batches the requests are in already (creating, if `create`, the batch of
        an input file a stopped run uploaded but did not start); returns the keys in none."""
        unsent: list[str] = []
        unstarted: dict[str, list[str]] = {}
        for key in self._requests:
            pointer = self._pointer(key)
            if pointer is not None and pointer.refusal is not None:
                self._refused[key] = pointer.refusal.error()
            elif pointer is None or pointer.settled:
                unsent.append(key)
            elif pointer.batch_id is None:
                unstarted.setdefault(pointer.input_file_id, []).append(key)
            else:
                self._add(pointer.batch_id, [key])
        for file_id, keys in unstarted.items():
            status = self._api.find(file_id) or (self._create(file_id) if create else None)
            if status is None:
                unsent += keys
                continue
            self._record(keys, file_id, status.id)
            self._add(status.id, keys)
        return unsent

    def submit(self, keys: Sequence[str]) -> None:
        """Send `keys` in as few batches as the route's limits allow."""
        route = self._route
        lines = [
            request_line(key, openai_body(self._requests[key], route.model, route.default_extras))
            for key in keys
        ]
        start = 0
        for end in split_lines(lines, route.batch_max_requests, route.batch_max_file_bytes):
            chunk = list(keys[start:end])
            file_id = self._api.upload(lines[start:end], name=f"{chunk[0]}.jsonl")
            self._record(chunk, file_id, None)  # found again, should the run stop here
            status = self._create(file_id)
            self._record(chunk, file_id, status.id)
            self._add(status.id, chunk)
            start = end

    def cancel(self) -> None:
        """Ask the API to stop the run's batches: what they answered is still collected."""
        for batch_id in self._batches:
            status = self._api.retrieve(batch_id)
            if not status.ended:
                self._api.cancel(batch_id)
                logger.info("Cancelling batch %s", batch_id)

    # --- run -------------------------------------------------------------------------------

    def collect(self, deadline: float) -> Iterator[BatchEvent]:
        """Look at the batches until each has ended or `deadline` (a `time.monotonic()`)
        passes, reading each one's answers as it ends; first, the refusals `attach` found."""
        yield from (Unanswered(key, error) for key, error in self._refused.items())
        live = dict(self._batches)
        delays = itertools.chain(POLL_DELAYS, itertools.repeat(POLL_EVERY_SECONDS))
        while live:
            completed = 0
            for batch_id in list(live):
                try:
                    status = self._api.retrieve(batch_id)
                except EndpointNotFoundError:  # deleted, or another account's: gone
                    yield from self._gone(batch_id, live.pop(batch_id))
                    continue
                if status.ended:
                    yield from self._answers(status, live.pop(batch_id))
                else:
                    completed += status.completed
            yield Progress(completed)
            left = deadline - time.monotonic()
            if live and left <= 0:
                for batch_id, keys in live.items():
                    yield from (Waiting(key, batch_id) for key in keys)
                return
            if live:
                time.sleep(min(next(delays), left))

    def _answers(self, status: BatchStatus, keys: list[str]) -> Iterator[BatchEvent]:
        asked = set(keys)
        seen: set[str] = set()
        unreadable: list[str] = []  # unreadable lines whose request cannot be told
        for kind, file_id in (("output", status.output_file_id), ("error", status.error_file_id)):
            if file_id is None:
                continue
            for answer in self._api.answers(file_id):
                key = answer.custom_id
                if key is not None and key in seen:  # the first answer counts
                    continue
                request = self._sent(status.id, key, asked)
                if isinstance(answer, UnreadableLine):
                    where = f"line {answer.number} of its {kind} file: {answer.reason}"
                    logger.warning("Batch %s: %s", status.id, where)
                    if key is None or request is None:
                        unreadable.append(where)
                        continue
                    seen.add(key)
                    self._settle(key)
                    if key in asked:
                        yield Unanswered(key, _unreadable(status, [where]))
                    continue
                if key is None or request is None:
                    logger.warning(
                        "Batch %s answered %s, a request it was not sent: ignored.", status.id, key
                    )
                    continue
                seen.add(key)
                event = self._event(answer, request, asked=key in asked)
                if isinstance(event, Unanswered):
                    self._settle(key, self._refusal_record(answer, event.error, status.id))
                if event.key in asked or isinstance(event, Collected):
                    yield event
        for key in keys:
            if key not in seen:
                self._settle(key)
                error = _unreadable(status, unreadable) if unreadable else _not_done(status)
                yield Unanswered(key, error)

    def _sent(self, batch_id: str, key: str | None, asked: set[str]) -> ImageRequest | None:
        """The request `key` names, if it was sent in batch `batch_id`: by this run, or by
        an earlier run that this run did not ask for it (it is paid for all the same)."""
        if key is None:
            return None
        if key in asked:
            return self._requests[key]
        pointer = self._pointer(key)
        if pointer is None or pointer.batch_id != batch_id or pointer.settled:
            return None
        return pointer.request

    def _gone(self, batch_id: str, keys: list[str]) -> Iterator[BatchEvent]:
        for key in keys:
            self._settle(key)
            yield Unanswered(
                key,
                BatchNotDoneError(
                    f"The API no longer knows batch {batch_id}; the next run sends the "
                    "request again."
                ),
            )

    def _event(
        self, answer: BatchAnswer, request: ImageRequest, *, asked: bool
    ) -> Collected | Unanswered:
        key = answer.custom_id
        if not answer.answered:
            return Unanswered(key, self._refusal(answer))
        try:
            return Collected(key, self._read_image(answer.body, request), asked=asked)
        except GptImageError as exc:
            return Unanswered(key, exc)
        except Exception as exc:  # an answer no reader expects: still the API's fault
            unreadable = f"The batch's answer could not be read ({type(exc).__name__})."
            return Unanswered(key, InvalidResponseError(unreadable))

    def _refusal(self, answer: BatchAnswer) -> GptImageError:
        if answer.status_code is not None:
            body = json.dumps(answer.body).encode()
            return error_for_openai_response(answer.status_code, {}, body, self._route.model)
        reason = (answer.error_message or "no reason given").strip().rstrip(".")
        charged = "it was not charged, and " if answer.error_code in NOT_RUN else ""
        return BatchNotDoneError(
            f"The batch did not run the request ({answer.error_code}: {reason}); "
            f"{charged}the next run sends it again."
        )

    def _refusal_record(
        self, answer: BatchAnswer, error: GptImageError, batch_id: str
    ) -> Refusal | None:
        """What to keep of `error`, where the API refused the request itself: another
        batch would refuse it again. An error of the moment (a rate limit, a server error)
        or of the route (a key, a quota, a model) is not kept: the request is sent again."""
        if answer.status_code is None or not isinstance(error, APIError):
            return None
        if error.retryable or error.drops_route or error.stops_batch:
            return None
        return Refusal(
            error_type=type(error).__name__,
            message=str(error),  # the line was read keyless (`BatchApiClient.answers`)
            status_code=answer.status_code,
            batch_id=batch_id,
        )

    # --- pointers --------------------------------------------------------------------------

    def _create(self, file_id: str) -> BatchStatus:
        status = self._api.create(file_id)
        self.created.append(status.id)
        logger.info("Created batch %s from %s", status.id, file_id)
        return status

    def _pointer(self, key: str) -> BatchPointer | None:
        try:
            result = self._store.read(pointer_key(key)).result
        except Exception:  # none yet, or unreadable: either way the request is unsent
            return None
        return result if isinstance(result, BatchPointer) else None

    def _record(self, keys: Sequence[str], file_id: str, batch_id: str | None) -> None:
        """Point each of `keys` at `file_id` and `batch_id`, a few writes at a time: the
        storage may be S3, where each is a round trip."""

        def write(key: str) -> None:
            pointer = BatchPointer(
                request=self._requests[key], input_file_id=file_id, batch_id=batch_id
            )
            self._store.write(pointer, key=pointer_key(key))

        with ThreadPoolExecutor(POINTER_WRITERS, thread_name_prefix="batch-pointer") as pool:
            list(pool.map(write, keys))

    def _settle(self, key: str, refusal: Refusal | None = None) -> None:
        """Mark `key` as answered by its batch without an image: to be sent again, or not,
        if the API refused it (`refusal`)."""
        pointer = self._pointer(key)
        if pointer is not None and (not pointer.settled or refusal is not None):
            settled = pointer.model_copy(update={"settled": True, "refusal": refusal})
            self._store.write(settled, key=pointer_key(key))


def _unreadable(status: BatchStatus, lines: Sequence[str]) -> InvalidResponseError:
    """The error of a request whose answer may be in an unreadable line of `status`'s
    files: it may have been charged, and the next run sends it again."""
    listed = "; ".join(lines[:LISTED_BATCH_ERRORS])
    more = (
        f" and {len(lines) - LISTED_BATCH_ERRORS} more" if len(lines) > LISTED_BATCH_ERRORS else ""
    )
    return InvalidResponseError(
        f"Batch {status.id} ended {status.status}, but its answer to the request could not "
        f"be read ({listed}{more}); it may have been charged. The next run sends it again."
    )


def _not_done(status: BatchStatus) -> BatchNotDoneError:
    if status.status == "failed" and status.errors:
        listed = "; ".join(status.errors[:LISTED_BATCH_ERRORS])
        return BatchNotDoneError(
            f"OpenAI refused batch {status.id}: {listed}. The next run sends the requests again."
        )
    return BatchNotDoneError(
        f"Batch {status.id} ended {status.status} before answering the request; it was not "
        "charged, and the next run sends it again."
    )
