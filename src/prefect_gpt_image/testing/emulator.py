"""A loopback HTTP server that speaks two GPT Image protocols: NexaAPI's endpoint on
RapidAPI (`POST /generate`) and OpenAI's Images API (`POST .../images/generations`, and
`POST .../images/edits` for edits of uploaded images, as OpenAI, gateways and Azure OpenAI's
v1 endpoint serve it), with OpenAI's Files and Batch APIs (`.../files`, `.../batches`) for
generations and edits submitted in bulk.

Tests, demos and benchmarks cannot reach (or pay for) the real APIs, so this server answers
the same requests with the same status codes and bodies, draws a fresh image per generation
or edit (captioned with the prompt's first words), records every call, with the SHA-256 of
each uploaded image, and can inject the failures a real deployment meets. It can also
enforce a requests-per-second limit, pad images to a realistic size and, run as its own
process (`python -m prefect_gpt_image.testing.emulator`), report its counters over HTTP.
A batch answers its request lines with the same code as synchronous calls, on a thread of
its own, and writes its output and error files to disk.

This module holds `GptImageEmulator`, its settings and what tests read and inject, and
composes the parts, one module each, none of which imports this one:

    _rapidapi          RapidAPI's protocol           _openai_images   OpenAI's Images API
    _openai_requests   reading OpenAI's requests     _openai_common   OpenAI's errors, forms
    _batches           the Batches API               _files           the Files API
    _batch_lines       a batch's JSONL files         _gateways        gateways' error words
    _faults            faults and the rate limit     _records         the calls recorded
    _drawing           the images, with Pillow       _server          HTTP, hosted images
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any

from prefect_gpt_image.testing._batches import BatchApi
from prefect_gpt_image.testing._drawing import _FORMATS, _Studio
from prefect_gpt_image.testing._drawing import MAX_SIDE as MAX_SIDE
from prefect_gpt_image.testing._drawing import _pad_png as _pad_png
from prefect_gpt_image.testing._faults import BATCH_OUTPUT_FAULTS as BATCH_OUTPUT_FAULTS
from prefect_gpt_image.testing._faults import Fault, _FaultQueue, _QueuedFault, _RateLimit
from prefect_gpt_image.testing._gateways import GATEWAYS as GATEWAYS
from prefect_gpt_image.testing._gateways import as_gateway as as_gateway
from prefect_gpt_image.testing._openai_images import _OpenAiImages
from prefect_gpt_image.testing._openai_requests import (
    _EDITS_SUFFIX,
    _GENERATIONS_SUFFIX,
    OPENAI_MODELS,
    _dimensions,
)
from prefect_gpt_image.testing._openai_requests import FLEXIBLE_MIN_PIXELS as FLEXIBLE_MIN_PIXELS
from prefect_gpt_image.testing._rapidapi import RESPONSE_SHAPES, _RapidApi
from prefect_gpt_image.testing._records import RecordedCall, _Records
from prefect_gpt_image.testing._server import _ImageStore, _not_found, _Reply, _Routes, _Server
from prefect_gpt_image.testing._shared import _Shared

__all__ = ["OPENAI_MODELS", "RESPONSE_SHAPES", "Fault", "GptImageEmulator", "RecordedCall", "main"]


class GptImageEmulator:
    """Serves the GPT Image generation API on loopback, with call records and fault injection.

    Two protocols share the server. A POST to `path` is NexaAPI's on RapidAPI (keys in
    `x-rapidapi-key` and `x-rapidapi-host`; `shape` and `image_format` shape its answers). A
    POST to any other path ending in `/images/generations` is OpenAI's Images API (key as
    `Authorization: Bearer` or Azure's `api-key`; images inline as `b64_json`; token usage
    and an `x-request-id` in every answer), so
    `openai.OpenAI(base_url=emulator.base_url + "/v1", api_key=...)` works against it. A POST
    to a path ending in `/images/edits` is its edits endpoint: a multipart form with 1 to 16
    PNG, JPEG or WebP files as `image` (or repeated `image[]`), each under 50 MB, and an
    optional PNG `mask` under 4 MB with an alpha channel and the first image's size; the
    other fields are generations', plus `input_fidelity`. It is answered, refused, faulted,
    rate limited and billed as a generation is, its images drawn alike, at the first image's
    size (within the model's sizes) for "auto", and its usage counts image input tokens.
    `models` maps each model that route serves to its fixed sizes, or None for flexible sizes
    (see `OPENAI_MODELS`); it is a plain dict attribute, so a test can retire a model mid-run
    with `emulator.models.pop(name)`, and `reset()` leaves it as it is. Models named
    gpt-image-2.5-* and gpt-image-2.6-* also take the qualities `xhigh` and `max`, and
    gpt-image-2.6-* takes `complexity`; others refuse them. A flexible size needs at least
    `min_pixels` pixels (655,360, as the API asks of gpt-image-2 and later; a suite that draws
    small images for speed may lower it).

    `latency` is the seconds a generation takes: its answer comes that long after the call,
    the time the emulator spends drawing the images included. `rate_limit` (requests per
    second, or None) is enforced on both routes like RapidAPI's gateway: a 429 with
    Retry-After once the burst of one second is spent, with each protocol's own body and
    `x-ratelimit-*` headers (OpenAI's reset as a duration such as `200ms`). `image_bytes`
    pads each PNG to at least that size. `keep_images=False` keeps only hashes of served
    images and drops each image once downloaded, so a long benchmark runs in bounded memory.

    The same prefixes serve OpenAI's Files and Batch APIs (see `_batches` and `_files`), so that
    `client.files` and `client.batches` work too. `POST .../files` uploads a file (a batch's
    requests as JSONL with `purpose="batch"`, at most `batch_max_file_bytes`), which
    `GET .../files/{id}`, `GET .../files/{id}/content` and `DELETE .../files/{id}` describe,
    download and delete; contents are kept on disk, in a directory removed by `stop()`.
    `POST .../batches` runs a file against `/v1/images/generations` or `/v1/images/edits`
    (JSON bodies, images as data URLs or file ids); `GET .../batches[/{id}]` lists or polls
    batches and `POST .../batches/{id}/cancel` cancels one. A batch checks its file (at most
    `batch_max_requests` lines) and moves from `validating` through `in_progress` and
    `finalizing` to `completed` over about `batch_processing_seconds`, answering each line as
    a synchronous call to its endpoint would be answered (refusals, queued faults, images and
    usage alike, but no rate limit or latency), into an output file and an error file. With
    `batch_expire_after` set, a batch expires once that many requests are processed;
    `add_batch_output_fault` writes some of its answer lines wrong. Lines are recorded in
    `batch_calls`, never in `calls`; `batches` lists every batch as the API describes it. A
    batch belongs to the project its creator named (`OpenAI-Project`), and other projects'
    calls get 404 for it. `add_batch_api_fault` makes a Files or Batches call misbehave as a
    real path does: carried out with its answer lost, or a 404 for what exists.

    `gateway` words every OpenAI-protocol error (synchronous answers, the Files and Batches
    APIs, and a batch's error lines) as a gateway in front of the API would: "litellm" sets
    `code` to the status and `type` to its own, prefixes the message, and answers a model
    it does not host with 400 "Invalid model name passed in model=..."; "azure" answers as
    Azure OpenAI (`contentFilter` with an `inner_error`, `DeploymentNotFound`, the status as
    the code of a rate limit or a wrong key); see `_gateways`. `echo_keys` quotes a rejected
    key whole in the 401's message, as some gateways do. Both are plain attributes.

    Besides the API, the server answers `GET /__emulator__/stats` (the counters as JSON) and
    `POST /__emulator__/reset` (calls `reset()`) without a key: they are test controls on
    loopback, for a benchmark that runs the emulator as its own process.
    """

    def __init__(
        self,
        api_key: str = "test-key",
        api_host: str = "gpt-image-1-5.p.rapidapi.com",
        path: str = "/generate",
        host: str = "127.0.0.1",
        port: int = 0,
        shape: str = "url",
        image_format: str = "png",
        latency: float = 0.0,
        reject_marker: str | None = "[reject]",
        subscribed: bool = True,
        rate_limit: float | None = None,
        rate_limit_headers: bool = True,
        image_bytes: int | None = None,
        keep_images: bool = True,
        models: Mapping[str, Sequence[str] | None] = OPENAI_MODELS,
        min_pixels: int = FLEXIBLE_MIN_PIXELS,
        batch_processing_seconds: float = 1.0,
        batch_max_requests: int = 50_000,
        batch_max_file_bytes: int = 200 * 1024**2,
        gateway: str | None = None,
        echo_keys: bool = False,
    ) -> None:
        if shape not in (*RESPONSE_SHAPES, "cycle"):
            raise ValueError(f"unknown shape {shape!r}; use one of {RESPONSE_SHAPES} or 'cycle'")
        if gateway is not None and gateway not in GATEWAYS:
            raise ValueError(f"unknown gateway {gateway!r}; use one of {GATEWAYS} or None")
        if image_format not in _FORMATS:
            raise ValueError(f"unknown image_format {image_format!r}; use png, jpeg or webp")
        if image_bytes is not None:
            if isinstance(image_bytes, bool) or not isinstance(image_bytes, int) or image_bytes < 1:
                raise ValueError(f"image_bytes must be a positive integer, got {image_bytes!r}")
            if image_format != "png":
                raise ValueError("image_bytes pads PNG images only; use image_format='png'")
        for name, limit in (
            ("batch_max_requests", batch_max_requests),
            ("batch_max_file_bytes", batch_max_file_bytes),
        ):
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"{name} must be a positive integer, got {limit!r}")
        for model, sizes in models.items():
            for size in sizes or ():
                dimensions = _dimensions(size)
                if dimensions is None or max(dimensions) > MAX_SIDE or min(dimensions) < 1:
                    raise ValueError(
                        f"model {model!r} lists size {size!r}; use 'WIDTHxHEIGHT' with sides "
                        f"from 1 to {MAX_SIDE}"
                    )
        self.api_key = api_key
        self.api_host = api_host
        self.path = path
        self.host = host
        self.port = port
        self.shape = shape
        self.image_format = image_format
        self.latency = latency
        self.reject_marker = reject_marker
        self.subscribed = subscribed
        self.rate_limit_headers = rate_limit_headers
        self.image_bytes = image_bytes
        self.keep_images = keep_images
        self.gateway = gateway
        self.echo_keys = echo_keys
        self.models: dict[str, Sequence[str] | None] = {
            model: None if sizes is None else tuple(sizes) for model, sizes in models.items()
        }
        self.min_pixels = min_pixels
        self.batch_processing_seconds = batch_processing_seconds
        self.batch_expire_after = None
        self.batch_max_requests = batch_max_requests
        self.batch_max_file_bytes = batch_max_file_bytes
        # The parts: each reads the settings above from `self` when it needs them, so a test
        # may change them mid-run; what they share (faults, the rate limit, the images drawn
        # and hosted, the records) is passed to each.
        self._limit = _RateLimit(rate_limit)
        self._faults = _FaultQueue()
        self._records = _Records()
        self._store = _ImageStore()
        self._studio = _Studio(self)
        shared = _Shared(self._faults, self._limit, self._studio, self._store, self._records)
        self._rapidapi = _RapidApi(self, shared)
        self._openai = _OpenAiImages(self, shared)
        self._batch_api = BatchApi(self, self._openai, self._records)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- configuration -----------------------------------------------------------------------

    @property
    def rate_limit(self) -> float | None:
        """Requests per second the endpoint admits, or None for no limit.

        A token bucket of `max(1, rate_limit)` tokens, refilled continuously; setting it (or
        `reset()`) fills the bucket. Only calls past the key and host checks spend a token.
        """
        return self._limit.rate

    @rate_limit.setter
    def rate_limit(self, value: float | None) -> None:
        self._limit.rate = value

    @property
    def fault_rate(self) -> float:
        """The share of POSTs `seed_faults` injects a random fault into; 0 after a reset."""
        return self._faults.rate

    @fault_rate.setter
    def fault_rate(self, value: float) -> None:
        self._faults.rate = value

    @property
    def random_faults(self) -> tuple[Fault, ...]:
        """The faults `seed_faults` draws from; none after a reset."""
        return self._faults.choices

    @random_faults.setter
    def random_faults(self, value: tuple[Fault, ...]) -> None:
        self._faults.choices = value

    @property
    def batch_processing_seconds(self) -> float:
        """About how long a batch takes, from `validating` to `completed`, when drawing its
        images takes less: a tenth validating, most of it spread over its requests, a tenth
        finalizing. Read when a batch is created, so setting it affects new batches only;
        0 runs them as fast as the images are drawn."""
        return self._batch_seconds

    @batch_processing_seconds.setter
    def batch_processing_seconds(self, value: float) -> None:
        if isinstance(value, bool) or not (0 <= value < math.inf):
            raise ValueError(f"batch_processing_seconds must be a number >= 0, got {value!r}")
        self._batch_seconds = float(value)

    @property
    def batch_expire_after(self) -> int | None:
        """None, or the requests a new batch processes before it expires, as a batch does
        when its 24 hours run out: the rest go to its error file as `batch_expired`."""
        return self._batch_expire_after

    @batch_expire_after.setter
    def batch_expire_after(self, value: int | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise ValueError(f"batch_expire_after must be None or an integer >= 0, got {value!r}")
        self._batch_expire_after = value

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> GptImageEmulator:
        """Bind the socket and serve from a daemon thread; returns self for chaining."""
        if self._server is not None:
            return self
        routes = _Routes(
            post=self._handle_post,
            api=self._handle_api,
            stats=lambda: self.stats,
            reset=self.reset,
        )
        self._server = _Server((self.host, self.port), routes, self._store)
        self._store.origin = f"http://{self.host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"gpt-image-emulator:{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections, stop batches and delete the files uploaded
        or written; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._batch_api.clear()

    def __enter__(self) -> GptImageEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """`http://host:port` of the running server."""
        if self._server is None:
            raise RuntimeError("the emulator is not running; call start() first")
        return self._store.origin

    @property
    def url(self) -> str:
        """Full URL of the RapidAPI-protocol generation endpoint."""
        return self.base_url + self.path

    @property
    def openai_base_url(self) -> str:
        """The `base_url` to give an `openai.OpenAI` client: `http://host:port/v1`."""
        return self.base_url + "/v1"

    # -- records -----------------------------------------------------------------------------

    @property
    def calls(self) -> list[RecordedCall]:
        """Answered POSTs to the endpoint, in arrival order."""
        return self._records.calls

    @property
    def billed(self) -> int:
        """Calls the real API would charge for: those answered 200."""
        return sum(call.status == 200 for call in self.calls)

    @property
    def billed_images(self) -> int:
        """Images the real API would charge for: `n` per call answered 200, none for a
        `no_image` answer (its model produced nothing)."""
        return sum(call.n for call in self.calls if call.status == 200 and call.fault != "no_image")

    def calls_for(self, prompt: str) -> list[RecordedCall]:
        """Calls whose prompt equals `prompt`."""
        return [call for call in self.calls if call.prompt == prompt]

    def billed_for(self, prompt: str) -> int:
        """Billed calls whose prompt equals `prompt`."""
        return sum(call.status == 200 for call in self.calls_for(prompt))

    @property
    def served(self) -> dict[str, bytes]:
        """Every valid image generated, by sha256 hex digest of its bytes.

        With `keep_images=False` each hash maps to `b""`: the bytes are not kept.
        """
        return self._studio.served

    @property
    def peak_concurrency(self) -> int:
        """The most generation requests (both routes) being handled at once since the last
        reset."""
        return self._records.peak

    @property
    def image_downloads(self) -> int:
        """GET requests under /images/, found or not."""
        return self._store.downloads

    @property
    def rate_limited(self) -> int:
        """Calls refused with 429 by `rate_limit` since the last reset (not injected faults)."""
        return sum(call.fault == "rate_limit" for call in self.calls)

    @property
    def batch_calls(self) -> list[RecordedCall]:
        """Request lines that batches processed, in the order processed; `calls` has none."""
        return self._records.batch_calls

    @property
    def batches(self) -> list[dict[str, Any]]:
        """Every batch created since the last reset, oldest first, as `GET .../batches/{id}`
        describes it now."""
        return self._batch_api.batches()

    @property
    def stats(self) -> dict[str, int]:
        """The counters `GET /__emulator__/stats` reports."""
        return {
            "calls": len(self.calls),
            "billed": self.billed,
            "rate_limited": self.rate_limited,
            "peak_concurrency": self.peak_concurrency,
            "image_downloads": self.image_downloads,
            "batch_requests": len(self.batch_calls),
            "batches_created": len(self.batches),
        }

    def reset(self) -> None:
        """Forget calls, images, faults, batches and files between tests and refill the rate
        limit's bucket; configuration such as `rate_limit`, `latency`, `models` (a retired
        model stays retired) and the `batch_*` settings, and image uniqueness, are kept."""
        self._batch_api.clear()  # first: batches draw and record
        self._records.clear()
        self._faults.clear()
        self._store.clear()
        self._studio.clear()
        self._rapidapi.clear()
        self._limit.refill()

    # -- faults ------------------------------------------------------------------------------

    def add_fault(
        self, fault: Fault, *, times: int = 1, prompt_contains: str | None = None
    ) -> None:
        """Inject `fault` into the next `times` POSTs whose prompt contains `prompt_contains`."""
        if times < 1:
            raise ValueError("times must be at least 1")
        self._faults.add(fault, times, prompt_contains)

    def add_batch_api_fault(self, operation: str, fault: Fault, *, times: int = 1) -> None:
        """Inject `fault` into the next `times` calls of a Files or Batches `operation`:
        "upload", "create", "list", "retrieve", "cancel" or "content". `Fault.answer_lost`
        carries the call out and loses its answer, `Fault.not_found` answers 404 for what
        exists, and `Fault.server_error` refuses the call without carrying it out."""
        self._batch_api.add_fault(operation, fault, times)

    def seed_faults(self, rate: float, faults: Sequence[Fault], seed: int = 0) -> None:
        """Inject a random one of `faults` into a `rate` share of POSTs, reproducibly."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        if rate > 0 and not faults:
            raise ValueError("a positive rate needs at least one fault")
        self._faults.seed(rate, faults, seed)

    def add_batch_output_fault(
        self,
        kind: str,
        *,
        prompt_contains: str | None = None,
        custom_id: str | None = None,
        times: int = 1,
    ) -> None:
        """Write a batch's answer lines wrong for the next `times` requests whose prompt
        contains `prompt_contains`; the requests are answered (and billed) all the same.
        `kind` is "not_json" (an HTML error page instead of the line), "truncated" (the line
        cut in half), "no_custom_id" (the line without its `custom_id`) or "stray" (the
        line, then a copy of it carrying `custom_id`, another request's)."""
        if kind not in BATCH_OUTPUT_FAULTS:
            raise ValueError(f"unknown output fault {kind!r}; use one of {BATCH_OUTPUT_FAULTS}")
        if (kind == "stray") != (custom_id is not None):
            raise ValueError("a stray line, and only a stray line, needs the custom_id it carries")
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a positive integer, got {times!r}")
        fault = Fault(kind, message=custom_id)
        self._batch_api.add_output_fault(_QueuedFault(fault, times, prompt_contains))

    # -- request handling --------------------------------------------------------------------

    def _handle_post(self, path: str, raw: bytes, headers: dict[str, str]) -> _Reply:
        """Route a POST: RapidAPI's protocol at `self.path`, OpenAI's at any other path ending
        in `/images/generations` or `/images/edits`, then Files and Batches, 404 elsewhere."""
        if path == self.path:
            answer = self._rapidapi.answer
        elif path.endswith((_GENERATIONS_SUFFIX, _EDITS_SUFFIX)):
            answer = self._openai.answer
        else:
            return self._handle_api("POST", path, headers, raw)
        with self._records.handling():
            return answer(path, raw, headers)

    def _handle_api(
        self, method: str, path: str, headers: Mapping[str, str], raw: bytes = b"", query: str = ""
    ) -> _Reply:
        """A request to the Files or Batches API (see `_batches`), or 404 for any other path."""
        reply = self._batch_api.handle(method, path, headers, raw, query)
        return reply if reply is not None else _not_found(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator in the foreground until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m prefect_gpt_image.testing.emulator",
        description=(
            "Serve a local stand-in for the GPT Image API: NexaAPI's on RapidAPI at /generate, "
            "and OpenAI's Images API at /v1/images/generations and /v1/images/edits, with its "
            "Files and Batch APIs at /v1/files and /v1/batches."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--api-host", default="gpt-image-1-5.p.rapidapi.com")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds per generation, drawing included"
    )
    parser.add_argument("--shape", choices=[*RESPONSE_SHAPES, "cycle"], default="url")
    parser.add_argument("--format", choices=sorted(_FORMATS), default="png", dest="image_format")
    parser.add_argument(
        "--rate-limit", type=float, default=None, help="requests per second, answered 429 above"
    )
    parser.add_argument(
        "--no-rate-limit-headers",
        action="store_false",
        dest="rate_limit_headers",
        help="enforce --rate-limit with bare 429s, without x-ratelimit-* headers",
    )
    parser.add_argument(
        "--image-bytes", type=int, default=None, help="pad each PNG to at least this many bytes"
    )
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=1.0,
        dest="batch_processing_seconds",
        help="about how long a batch takes from validating to completed",
    )
    parser.add_argument(
        "--keep-images",
        action="store_true",
        help="keep every image in memory (by default only hashes, for long runs)",
    )
    args = parser.parse_args(argv)
    try:
        emulator = GptImageEmulator(
            api_key=args.api_key,
            api_host=args.api_host,
            host=args.host,
            port=args.port,
            shape=args.shape,
            image_format=args.image_format,
            latency=args.latency,
            rate_limit=args.rate_limit,
            rate_limit_headers=args.rate_limit_headers,
            image_bytes=args.image_bytes,
            keep_images=args.keep_images,
            batch_processing_seconds=args.batch_processing_seconds,
        )
    except ValueError as exc:
        parser.error(str(exc))
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with emulator:
        print(emulator.base_url, flush=True)
        stopped.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
