"""The HTTP client for the generation endpoint: one call in, one checked image out."""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from typing import TYPE_CHECKING, Any

import httpx
from prefect.utilities.asyncutils import run_sync_in_worker_thread

from prefect_gpt_image._billing import Budget, call_cost, worst_case_cost
from prefect_gpt_image._charges import Charges
from prefect_gpt_image._edits import InputFile, input_files
from prefect_gpt_image._images import inspect_image, media_type_label
from prefect_gpt_image._redaction import keyless
from prefect_gpt_image._request_bodies import openai_body, rapidapi_body
from prefect_gpt_image._responses import (
    ImageReference,
    InlineImage,
    error_for_openai_response,
    error_for_response,
    find_images,
    first_url,
    parse_json,
    usage_of,
)
from prefect_gpt_image._retry_policy import (
    DOWNLOAD_ATTEMPTS,
    DOWNLOAD_RETRY_DELAYS,
    call_with_retries,
)
from prefect_gpt_image._throttle import throttle_for
from prefect_gpt_image._url_safety import ImageHostPolicy, PinnedURL, pin_image_url
from prefect_gpt_image.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    GptImageError,
    InvalidImageError,
    InvalidResponseError,
    RouteDroppedError,
)
from prefect_gpt_image.models import ApiLimits, GeneratedImage, ImageFile, ImageRequest, Usage

if TYPE_CHECKING:
    import openai
    from prefect_aws import S3Bucket

    from prefect_gpt_image._routes import OpenAIRoute, RapidAPIRoute, Route


logger = logging.getLogger(__name__)

DOWNLOAD_READ_TIMEOUT_SECONDS = 30.0
DOWNLOAD_DEADLINE_SECONDS = 120.0
"""A download that trickles is cut off here, whatever its read timeout."""
MAX_REDIRECTS = 5
_SHOWN_URL_CHARS = 200


EditFiles = tuple[list[InputFile], InputFile | None]
"""An edit's images and mask, read for sending."""


@functools.cache
def shared_http_client() -> httpx.Client:
    """The connection pool generation requests share."""
    return _http_client()


class GenerationClient(ABC):
    """Generates the images of one request per call, and returns them downloaded and
    checked, with what the call cost.

    Provider URLs expire, so images are fetched at once. The key is sent only to the
    generation endpoint, never to the host serving the image.
    """

    def __init__(self, route: Route, *, allow_internal_images: bool | None = None) -> None:
        """`allow_internal_images`: by default (None) images come from public addresses,
        and from the API's own host and port where the API itself is at an internal address
        (an emulator, an in-house proxy); True also allows every other internal address,
        False none. Cloud metadata addresses are never fetched from (`url_safety`)."""
        self._route = route
        self._spec = route.model_spec()
        self._http = shared_http_client()
        self._throttle = throttle_for(route.endpoint_url, route.api_key.get_secret_value())
        self._image_hosts = ImageHostPolicy.for_api(
            route.endpoint_url, allow_internal=allow_internal_images
        )
        read_timeout = min(DOWNLOAD_READ_TIMEOUT_SECONDS, route.timeout_seconds)
        self._download_timeout = httpx.Timeout(read_timeout, connect=min(10.0, read_timeout))

    def generate(
        self,
        request: ImageRequest,
        limits: ApiLimits | None = None,
        *,
        still_live: Callable[[], bool] | None = None,
        budget: Budget | None = None,
        charged_to: str | None = None,
        input_bucket: S3Bucket | None = None,
    ) -> GeneratedImage:
        """One paid call. `limits` say how busy this process may keep the API (see
        `prefect_gpt_image._throttle`); downloads are not counted against them.
        `still_live` is asked once the call's turn has come: a route dropped while the
        request waited is not called. `budget` holds the call's worst case before it is
        sent, and refuses it if that could pass the cap (see `prefect_gpt_image._billing`), and
        records what it was charged for `charged_to` (a task run). An edit's inputs are read
        once its turn has come, `s3://` ones through `input_bucket` where it holds them.

        Whatever fails leaves without the route's key in its text (`_redaction.keyless`)."""
        with keyless(self._route.api_key.get_secret_value()):
            return self._generate(
                request,
                limits,
                still_live=still_live,
                budget=budget,
                charged_to=charged_to,
                input_bucket=input_bucket,
            )

    def _generate(
        self,
        request: ImageRequest,
        limits: ApiLimits | None,
        *,
        still_live: Callable[[], bool] | None,
        budget: Budget | None,
        charged_to: str | None,
        input_bucket: S3Bucket | None,
    ) -> GeneratedImage:
        route = self._route
        with self._throttle.admit(limits) as admission:
            if still_live is not None and not still_live():
                raise RouteDroppedError(f"The route {route.route_name} was dropped.")
            files = input_files(request, bucket=input_bucket) if request.is_edit else None
            worst_case = worst_case_cost(self._spec, request)
            reservation = (budget or Budget()).reserve(worst_case, owner=charged_to)
            started = time.monotonic()
            try:
                response = self._post(request, files)
            except httpx.TimeoutException as exc:
                error = APITimeoutError(
                    f"No answer from {route.shown_url} within {route.timeout_seconds:g} s. "
                    "Raise timeout_seconds in the credentials block for slow, high-quality "
                    "generations."
                )
                if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                    reservation.not_charged()  # never sent: nothing to bill
                else:  # sent: the provider may finish it, and bill it
                    error.charges = reservation.possibly_charged()
                raise error from None
            except httpx.TransportError as exc:
                reservation.not_charged()
                raise APIConnectionError(
                    f"Could not reach {route.shown_url}: {type(exc).__name__}: {exc}"
                ) from None
            admission.answered(response.status_code, response.headers)
        logger.debug(
            "POST %s -> %d in %.2f s",
            route.shown_url,
            response.status_code,
            time.monotonic() - started,
        )
        if not response.is_success:
            reservation.not_charged()
            raise self._error(response.status_code, response.headers, response.content)
        # The API answered 2xx: the call is paid for, whatever comes next.
        usage: Usage | None = None
        try:
            payload = parse_json(response.content)
            usage = usage_of(payload)
            image = self._images(payload, request, usage)
        except Exception as exc:
            unusable: GptImageError = (
                exc
                if isinstance(exc, GptImageError)
                else InvalidResponseError(
                    f"The API answered {response.status_code}, but its answer could not be "
                    f"read ({type(exc).__name__}). It is charged; the image is generated again."
                )
            )
            unusable.charges = reservation.charged(call_cost(self._spec, request, request.n, usage))
            if unusable is exc:
                raise
            raise unusable from None
        reservation.charged(image.cost_usd)
        return image

    @abstractmethod
    def _post(self, request: ImageRequest, files: EditFiles | None) -> httpx.Response:
        """Send the request, with an edit's `files`; transport failures raise httpx's
        errors."""

    @abstractmethod
    def _error(self, status: int, headers: httpx.Headers, body: bytes) -> APIError:
        """The error a non-2xx answer means."""

    def _images(
        self, payload: object, request: ImageRequest, usage: Usage | None, *, batch: bool = False
    ) -> GeneratedImage:
        route = self._route
        files = [self._file(reference) for reference in find_images(payload)]
        first, *more = files
        return GeneratedImage(
            **first.model_dump(),
            request=request,
            model=route.model,
            route=route.route_name,
            source_url=first_url(payload),
            generated_at=datetime.now(timezone.utc),
            cost_usd=call_cost(self._spec, request, len(files), usage, batch=batch),
            usage=usage,
            more_images=more,
        )

    def _file(self, reference: ImageReference) -> ImageFile:
        cap = self._route.max_image_bytes
        media_type: str | None = None
        if isinstance(reference.data, InlineImage):
            # Weighed before it is decoded: an answer may carry far more than the cap.
            if reference.data.size > cap:
                raise _too_large(reference.data.size, cap)
            data, media_type = reference.data.decoded(), reference.data.media_type
        elif reference.data is not None:
            data = reference.data
        else:
            data, media_type = self._download(reference.url)
        if len(data) > cap:
            raise _too_large(len(data), cap)
        info = inspect_image(data, media_type)
        return ImageFile(
            data=data,
            media_type=info.media_type,
            sha256=hashlib.sha256(data).hexdigest(),
            width=info.width,
            height=info.height,
        )

    def _download(self, url: str | None) -> tuple[bytes, str | None]:
        """Fetch a paid image, retrying transient failures: it cannot be fetched later.
        Returns its bytes and the media type they were labelled with."""
        assert url is not None
        try:
            return call_with_retries(
                partial(self._download_once, url), DOWNLOAD_RETRY_DELAYS, retry_if=_transient
            )
        except (httpx.TransportError, _TransientDownloadError) as exc:
            raise InvalidResponseError(
                f"The generated image could not be downloaded from {_shown(url)} after "
                f"{DOWNLOAD_ATTEMPTS} attempts: {type(exc).__name__}: {exc}"
            ) from None

    def _download_once(self, url: str) -> tuple[bytes, str | None]:
        cap = self._route.max_image_bytes
        deadline = time.monotonic() + DOWNLOAD_DEADLINE_SECONDS
        for _ in range(MAX_REDIRECTS + 1):
            # Redirects are followed by hand, so that every hop is checked, and each is
            # fetched from the address its check resolved (`url_safety`).
            try:
                pinned = pin_image_url(url, self._image_hosts)
            except OSError as exc:
                raise _TransientDownloadError(
                    f"the image host's name could not be looked up ({exc})"
                ) from None
            r = self._send_pinned(pinned)
            try:
                if r.is_redirect:
                    url = pinned.join(r.headers["location"])
                    continue
                _check_download_status(r.status_code)
                if _content_length(r) > cap:
                    raise _too_large(_content_length(r), cap)
                chunks: list[bytes] = []
                size = 0
                for chunk in r.iter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise _too_large(size, cap)
                    if time.monotonic() > deadline:
                        raise _TransientDownloadError(
                            f"still downloading after {DOWNLOAD_DEADLINE_SECONDS:g} s"
                        )
                    chunks.append(chunk)
                return b"".join(chunks), r.headers.get("content-type")
            except httpx.DecodingError:
                raise InvalidResponseError(
                    "The image host sent a body that could not be decoded "
                    f"(Content-Encoding {media_type_label(r.headers.get('content-encoding'))})."
                ) from None
            finally:
                r.close()
        raise InvalidResponseError(f"The image URL redirected more than {MAX_REDIRECTS} times.")

    def _send_pinned(self, pinned: PinnedURL) -> httpx.Response:
        """GET `pinned`, connecting to its checked address only; the answer is streamed.

        Behind a proxy (HTTP_PROXY, HTTPS_PROXY), the proxy connects and resolves the name
        itself: the URL was checked all the same, but only a direct connection can be held
        to the checked address."""
        if _through_proxy(pinned):
            request = self._http.build_request(
                "GET", pinned.url, headers=_DOWNLOAD_HEADERS, timeout=self._download_timeout
            )
            return self._http.send(request, stream=True)
        headers = {**_DOWNLOAD_HEADERS, "Host": pinned.host_header}
        extensions: dict[str, Any] = {}
        if pinned.scheme == "https":
            # The certificate is checked against the host name sent as the server name; a
            # connection verified for one name is never reused for another name that
            # resolved to the same address.
            extensions["sni_hostname"] = pinned.host
            headers["Connection"] = "close"
        http = download_http_client()
        try:
            request = http.build_request(
                "GET",
                pinned.connect_url,
                headers=headers,
                extensions=extensions,
                timeout=self._download_timeout,
            )
        except httpx.InvalidURL:
            raise InvalidResponseError(
                f"The API pointed at an image URL that cannot be fetched: {_shown(pinned.url)}"
            ) from None
        return http.send(request, stream=True)


class AsyncGenerationClient:
    """A `GenerationClient` for async code: the same call, run in a worker thread, so that
    async and sync tasks share one throttle, one budget and one connection pool."""

    def __init__(self, client: GenerationClient) -> None:
        self._client = client

    async def generate(
        self,
        request: ImageRequest,
        limits: ApiLimits | None = None,
        *,
        still_live: Callable[[], bool] | None = None,
        budget: Budget | None = None,
        charged_to: str | None = None,
    ) -> GeneratedImage:
        """`GenerationClient.generate`, awaited."""
        call = partial(
            self._client.generate,
            request,
            limits,
            still_live=still_live,
            budget=budget,
            charged_to=charged_to,
        )
        return await run_sync_in_worker_thread(call)


_DOWNLOAD_HEADERS = {"Accept-Encoding": "identity"}
"""Images are compressed already: a host asked for them as they are has no reason to
compress them again, which would let a few kilobytes inflate to many megabytes."""


@functools.cache
def download_http_client() -> httpx.Client:
    """The connection pool image downloads share: direct connections only, each to the
    address its URL was checked at; redirects are followed by hand."""
    return _http_client(
        verify=httpx.create_ssl_context(trust_env=True),  # SSL_CERT_FILE, SSL_CERT_DIR
        trust_env=False,  # proxies: see GenerationClient._send_pinned
        follow_redirects=False,
    )


def _http_client(**options: Any) -> httpx.Client:
    """A connection pool for the tasks of a process, which run in threads and share it."""
    return httpx.Client(
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        headers={"user-agent": "prefect-gpt-image"},
        **options,
    )


def _through_proxy(pinned: PinnedURL) -> bool:
    proxies = urllib.request.getproxies()
    if not (proxies.get(pinned.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(pinned.host)


def _content_length(response: httpx.Response) -> int:
    try:
        return int(response.headers.get("content-length") or 0)
    except ValueError:
        return 0


def _check_download_status(status: int) -> None:
    if status >= 500:
        raise _TransientDownloadError(f"{status} from the image host")
    if status >= 400:
        raise InvalidResponseError(
            f"The generated image's URL answered {status}: it has expired or was never "
            "there. The image must be generated again."
        )
    if not 200 <= status < 300:
        raise InvalidResponseError(
            f"The generated image's URL answered {status} instead of the image."
        )


class _TransientDownloadError(APIError):
    retryable = True


def _transient(exc: Exception) -> bool:
    """Whether another try of a download can help: a lost connection, a host that did
    not answer or resolve, a download that trickled past its deadline."""
    return isinstance(exc, httpx.TransportError | _TransientDownloadError)


def _too_large(size: int, cap: int) -> InvalidImageError:
    return InvalidImageError(
        f"The generated image is larger ({size:,} bytes) than max_image_bytes ({cap:,}) "
        "allows; raise it in the credentials block to accept it."
    )


def _shown(url: str) -> str:
    return url if len(url) <= _SHOWN_URL_CHARS else url[:_SHOWN_URL_CHARS] + "..."


class RapidAPIClient(GenerationClient):
    """NexaAPI's endpoint on RapidAPI: a JSON POST with the key in `x-rapidapi-key`."""

    _route: RapidAPIRoute

    def _post(self, request: ImageRequest, files: EditFiles | None) -> httpx.Response:
        assert files is None, "RapidAPI's route does not edit: see Route.can_edit"
        route = self._route
        return self._http.post(
            route.endpoint_url,
            json=rapidapi_body(request, route.default_extras),
            headers={
                "x-rapidapi-key": route.api_key.get_secret_value(),
                "x-rapidapi-host": route.api_host,
            },
            timeout=httpx.Timeout(route.timeout_seconds, connect=10.0),
        )

    def _error(self, status: int, headers: httpx.Headers, body: bytes) -> APIError:
        return error_for_response(status, headers, body)


class OpenAIClient(GenerationClient):
    """The OpenAI protocol, through the official `openai` package with its own retries
    off: `prefect_gpt_image._retry_policy` is the only retry policy."""

    _route: OpenAIRoute

    def _post(self, request: ImageRequest, files: EditFiles | None) -> httpx.Response:
        import openai

        route = self._route
        body = openai_body(request, route.model, route.default_extras)
        options: dict[str, Any] = {
            "model": body.pop("model"),
            "prompt": body.pop("prompt"),
            "extra_body": body,
            "extra_headers": auth_headers(route),
            "timeout": route.timeout_seconds,
        }
        images = openai_client(route).images.with_raw_response
        try:
            if files is None:
                raw = images.generate(**options)
            else:  # multipart, to /images/edits
                inputs, mask = files
                raw = images.edit(image=inputs, mask=mask or openai.omit, **options)
            answer = raw.http_response
        except openai.APIStatusError as exc:
            answer = exc.response
        except openai.APITimeoutError as exc:
            raise httpx.ReadTimeout(str(exc)) from None
        except openai.APIConnectionError as exc:
            raise httpx.ConnectError(str(exc.__cause__ or exc)) from None
        # The package has an HTTP stack of its own: its answer, as the other routes' are.
        return httpx.Response(
            answer.status_code, headers=list(answer.headers.multi_items()), content=answer.content
        )

    def _error(self, status: int, headers: httpx.Headers, body: bytes) -> APIError:
        return error_for_openai_response(status, headers, body, self._route.model)

    def batch_image(self, payload: object, request: ImageRequest) -> GeneratedImage:
        """The image of an answer the Batch API gave, checked as a synchronous answer's
        is, and priced at the batch price. The answer is paid for even if it is unusable."""
        usage = usage_of(payload)
        try:
            with keyless(self._route.api_key.get_secret_value()):
                return self._images(payload, request, usage, batch=True)
        except GptImageError as exc:
            cost = call_cost(self._spec, request, request.n, usage, batch=True)
            exc.charges = Charges(calls=1, usd=cost)
            raise


_openai_clients: dict[tuple[str, ...], openai.OpenAI] = {}
_openai_clients_lock = threading.Lock()


def openai_client(route: OpenAIRoute) -> openai.OpenAI:
    """One `openai.OpenAI` per endpoint, key and billing account: one pool each."""
    import openai

    key = route.api_key.get_secret_value()
    identity = (
        route.base_url,
        hashlib.sha256(key.encode()).hexdigest(),
        route.auth_header,
        route.organization or "",
        route.project or "",
    )
    with _openai_clients_lock:
        client = _openai_clients.get(identity)
        if client is None:
            client = openai.OpenAI(
                api_key=key,
                base_url=route.base_url,
                organization=route.organization,
                project=route.project,
                max_retries=0,
            )
            _openai_clients[identity] = client
        return client


def auth_headers(route: OpenAIRoute) -> dict[str, Any]:
    """Azure OpenAI's `api-key` header instead of the bearer token, where asked."""
    import openai

    if route.auth_header != "api-key":
        return {}
    return {"api-key": route.api_key.get_secret_value(), "Authorization": openai.Omit()}
