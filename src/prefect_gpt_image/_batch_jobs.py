"""A run's requests on OpenAI's Batch API: which are in a batch already, sending the rest,
and reading each batch's answers once it ends.

Every request sent is recorded under its cache key (a `BatchPointer`, kept where the
generation cache is, each written whole) before its batch is created and again after, so
that a run stopped at any point and started again finds its batches instead of paying for
new ones. Once a batch ends, its images go to the cache like any other, so that the cache,
not the pointer, answers for them next time. A line of its output is taken only for a
request that batch was sent; a line that cannot be read fails its request (where it can be
told) and no other. A request the API refused is an answer too: the refusal is kept in its
pointer, and the request is not sent again until it changes (a new cache key) or
`cache.refresh` asks. A request the batch did not answer otherwise is marked settled, and
the next run sends it again.

`sent` is the one rule for whether a request was sent. It fails closed: a record that
cannot be read sends the question to the API, and a batch the API does not find, or one
another project owns, is never taken as proof that nothing was sent.
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
from enum import Enum
from functools import partial
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
from prefect_gpt_image._caching import UnreadableRecord, read_record, write_whole
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
    from prefect_gpt_image._routes import OpenAIRoute

logger = logging.getLogger(__name__)

POLL_DELAYS = (1.0, 2.0, 5.0, 10.0, 20.0)
"""Waits between looks at a run's batches: quick at first (a small batch may end in
seconds), then every `POLL_EVERY_SECONDS`."""
POLL_EVERY_SECONDS = 30.0
LISTED_BATCH_ERRORS = 5
POINTER_WRITERS = 8
"""Records read or written at a time."""
NOT_RUN = frozenset({"batch_expired", "batch_cancelled"})
"""Why a batch lists a request it never ran, and so never charged for."""
NOT_FOUND_LOOKS = 3
"""Looks, at the polls' pace, at a batch the API answers 404 for before its requests are
reported not found: one answer (a proxy's, a lagging replica's) is not proof."""


class BatchOwner(BaseModel, frozen=True):
    """Whose batch it is: batches belong to an OpenAI organization and project, and a route
    for another one does not see them."""

    organization: str | None = None
    project: str | None = None

    def __str__(self) -> str:
        project = f"project {self.project}" if self.project else "the key's own project"
        return f"organization {self.organization}, {project}" if self.organization else project


def batch_owner(route: OpenAIRoute) -> BatchOwner:
    return BatchOwner(organization=route.organization, project=route.project)


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
            "the request changes, or with cache.refresh on.)",
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
    owner: BatchOwner | None = Field(
        default=None, description="Who owns the batch; None in records made before it was kept."
    )


class Sent(Enum):
    """Whether a request was sent to the Batch API, as `sent` reads its record."""

    NO = "no"
    """Nothing recorded, its batch ended without answering it, or cache.refresh: send it."""
    UPLOADED = "uploaded"
    """In an input file whose batch may not have been created: ask the API by that file."""
    IN_BATCH = "in batch"
    """In a batch: collect it from there."""
    REFUSED = "refused"
    """The API refused it in a batch: the refusal is its answer, not sent again."""
    ELSEWHERE = "elsewhere"
    """In a batch of another organization or project, which this route cannot see: not
    sent again."""
    UNKNOWN = "unknown"
    """The record cannot be read: ask the API, never take it for "not sent"."""


def sent(
    pointer: BatchPointer | UnreadableRecord | None,
    owner: BatchOwner | None,
    *,
    refresh: bool = False,
) -> Sent:
    """The one rule for whether a request was sent, from its record (or the error reading it),
    for a route of `owner` (None: any, for a synchronous run, which collects no batch).
    `refresh` (cache.refresh) pays again, whatever was sent."""
    if refresh:
        return Sent.NO
    if isinstance(pointer, UnreadableRecord):
        return Sent.UNKNOWN
    if pointer is not None and pointer.refusal is not None:
        return Sent.REFUSED
    if pointer is None or pointer.settled:
        return Sent.NO
    if owner is not None and pointer.owner is not None and pointer.owner != owner:
        return Sent.ELSEWHERE
    if pointer.batch_id is None:
        return Sent.UPLOADED
    return Sent.IN_BATCH


def pointer_key(cache_key: str) -> str:
    return f"{cache_key}-batch"


def read_pointer(store: ResultStore, key: str) -> BatchPointer | UnreadableRecord | None:
    """The record of where request `key` was sent, None if it has none, or the error reading
    it."""
    try:
        record = read_record(store, pointer_key(key))
    except UnreadableRecord as exc:
        logger.warning("%s", exc)
        return exc
    if record is None or isinstance(record, BatchPointer):
        return record
    return UnreadableRecord(f"the record {pointer_key(key)} is not a batch pointer")


def in_batches(
    store: ResultStore, requests: Mapping[str, Sequence[str]]
) -> dict[str, GptImageError]:
    """Of `requests` (each a key, and the keys it may be recorded under), those a synchronous
    run must not pay for, and why. Read a few at a time: the storage may be S3."""
    with ThreadPoolExecutor(POINTER_WRITERS, thread_name_prefix="batch-pointer") as pool:
        errors = list(pool.map(partial(_in_a_batch, store), requests.values()))
    return {key: error for key, error in zip(requests, errors, strict=True) if error is not None}


def _in_a_batch(store: ResultStore, keys: Sequence[str]) -> GptImageError | None:
    """Why a synchronous run must not pay for a request (cached under any of `keys`): a
    batch-mode run sent it, or may have, and its batch answers it at half the price; or a
    batch's answer was a refusal."""
    for key in keys:
        pointer = read_pointer(store, key)
        match sent(pointer, None):
            case Sent.NO:
                continue
            case Sent.REFUSED:  # the API's answer: it would refuse it again
                assert isinstance(pointer, BatchPointer) and pointer.refusal is not None
                return pointer.refusal.error()
        where = pointer.batch_id if isinstance(pointer, BatchPointer) else None
        return _not_sent_again(
            f"It was sent in an OpenAI batch{f' ({where})' if where else ''} by a run with "
            "batch on, or may have been.",
            "run with batch on to collect it, or turn cache.refresh on to pay for it anew.",
        )
    return None


def sending_lock_key(route: OpenAIRoute) -> str:
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
        route: OpenAIRoute,
        store: ResultStore,
        requests: Mapping[str, ImageRequest],
        read_image: ReadImage,
    ) -> None:
        self._route = route
        self._owner = batch_owner(route)
        self._api = BatchApiClient(route)
        self._store = store
        self._requests = dict(requests)
        self._read_image = read_image
        self._batches: dict[str, list[str]] = {}
        """Batch id -> the keys of this run it answers."""
        self._batch_of: dict[str, str] = {}
        self._held_back: dict[str, GptImageError] = {}
        """Requests this run does not send: refused in an earlier batch, or in a batch this
        run cannot collect."""
        self.created: list[str] = []
        """The batches this run created."""

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

    def attach(self, *, create: bool = True, refresh: bool = False) -> list[str]:
        """Find the batches the requests are in already (creating, if `create`, the batch of
        an input file a stopped run uploaded but did not start); returns the keys to send,
        as `sent` rules (`refresh`: every key)."""
        unsent: list[str] = []
        unstarted: dict[str, list[str]] = {}
        unknown: list[str] = []
        for key in self._requests:
            pointer = self._pointer(key)
            match sent(pointer, self._owner, refresh=refresh):
                case Sent.NO:
                    unsent.append(key)
                case Sent.UNKNOWN:
                    unknown.append(key)
                case Sent.REFUSED:
                    assert isinstance(pointer, BatchPointer) and pointer.refusal is not None
                    self._held_back[key] = pointer.refusal.error()
                case Sent.ELSEWHERE:
                    assert isinstance(pointer, BatchPointer)
                    self._held_back[key] = _elsewhere(pointer, self._owner)
                case Sent.UPLOADED:
                    assert isinstance(pointer, BatchPointer)
                    unstarted.setdefault(pointer.input_file_id, []).append(key)
                case Sent.IN_BATCH:
                    assert isinstance(pointer, BatchPointer) and pointer.batch_id is not None
                    self._add(pointer.batch_id, [key])
        if unknown:
            unsent += self._ask(unknown)
        for file_id, keys in unstarted.items():
            status = self._api.find(file_id) or (self._create(file_id) if create else None)
            if status is None:
                unsent += keys
                continue
            self._record(keys, file_id, status.id)
            self._add(status.id, keys)
        return unsent

    def _ask(self, keys: Sequence[str]) -> list[str]:
        """Ask the API which batches hold `keys`, whose records cannot be read; returns those
        in none. A key the API cannot be asked about is held back, not sent."""
        try:
            holding = self._api.holding(set(keys))
        except GptImageError as exc:
            for key in keys:
                self._held_back[key] = _not_sent_again(
                    "Its batch record could not be read, and the API could not say whether "
                    f"it was sent ({exc}).",
                    "the next run asks again.",
                )
            return []
        unsent: list[str] = []
        for key in keys:
            status = holding.get(key)
            if status is None:
                unsent.append(key)
                continue
            logger.info("Found the request %s, whose record was unreadable, in %s", key, status.id)
            self._record([key], status.input_file_id, status.id)  # mended
            self._add(status.id, [key])
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
        passes, reading each one's answers as it ends; first, the requests `attach` held
        back."""
        yield from (Unanswered(key, error) for key, error in self._held_back.items())
        live = dict(self._batches)
        not_found: dict[str, int] = {}
        delays = itertools.chain(POLL_DELAYS, itertools.repeat(POLL_EVERY_SECONDS))
        while live:
            completed = 0
            for batch_id in list(live):
                try:
                    status = self._api.retrieve(batch_id)
                except EndpointNotFoundError:  # another project's, or one answer gone astray
                    not_found[batch_id] = not_found.get(batch_id, 0) + 1
                    if not_found[batch_id] >= NOT_FOUND_LOOKS:
                        yield from self._not_found(batch_id, live.pop(batch_id))
                    continue
                not_found.pop(batch_id, None)
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
                request = self._request_in(status.id, key, asked)
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

    def _request_in(self, batch_id: str, key: str | None, asked: set[str]) -> ImageRequest | None:
        """The request `key` names, if it was sent in batch `batch_id`: by this run, or by
        an earlier run that this run did not ask for it (it is paid for all the same)."""
        if key is None:
            return None
        if key in asked:
            return self._requests[key]
        pointer = self._pointer(key)
        if not isinstance(pointer, BatchPointer) or sent(pointer, None) is not Sent.IN_BATCH:
            return None
        return pointer.request if pointer.batch_id == batch_id else None

    def _not_found(self, batch_id: str, keys: list[str]) -> Iterator[BatchEvent]:
        """Requests whose batch the API kept answering 404 for: it may run, and bill, under
        another key or project, so they are not settled and not sent again."""
        error = _not_sent_again(
            f"The API did not find batch {batch_id} in {NOT_FOUND_LOOKS} looks with this "
            f"route's key and {self._owner}.",
            "run with the key and project that created it to collect it, or turn "
            "cache.refresh on to pay for it anew.",
        )
        yield from (Unanswered(key, error) for key in keys)

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
        if error.retryable or error.drops_route or error.stops_run:
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

    def _pointer(self, key: str) -> BatchPointer | UnreadableRecord | None:
        return read_pointer(self._store, key)

    def _record(self, keys: Sequence[str], file_id: str, batch_id: str | None) -> None:
        """Point each of `keys` at `file_id` and `batch_id`, a few writes at a time: the
        storage may be S3, where each is a round trip."""

        def write(key: str) -> None:
            pointer = BatchPointer(
                request=self._requests[key],
                input_file_id=file_id,
                batch_id=batch_id,
                owner=self._owner,
            )
            write_whole(self._store, pointer_key(key), pointer)

        with ThreadPoolExecutor(POINTER_WRITERS, thread_name_prefix="batch-pointer") as pool:
            list(pool.map(write, keys))

    def _settle(self, key: str, refusal: Refusal | None = None) -> None:
        """Mark `key` as answered by its batch without an image: to be sent again, or not,
        if the API refused it (`refusal`)."""
        pointer = self._pointer(key)
        if isinstance(pointer, BatchPointer) and (not pointer.settled or refusal is not None):
            settled = pointer.model_copy(update={"settled": True, "refusal": refusal})
            write_whole(self._store, pointer_key(key), settled)


def _elsewhere(pointer: BatchPointer, owner: BatchOwner) -> BatchNotDoneError:
    where = pointer.batch_id or f"the batch of {pointer.input_file_id}"
    return _not_sent_again(
        f"It was sent in {where} of {pointer.owner}, which this route ({owner}) cannot see.",
        "run with that organization and project to collect it, or turn cache.refresh on to "
        "pay for it anew.",
    )


def _not_sent_again(why: str, remedy: str) -> BatchNotDoneError:
    """The error of a request held back because it may be in a batch already: `why`, and
    what the user can do (`remedy`)."""
    return BatchNotDoneError(
        f"{why} It was not sent again, so that it is not paid for twice: {remedy}"
    )


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
