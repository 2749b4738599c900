"""The HTTP client for the generation endpoint: one call in, one checked image out."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import httpx

from prefect_gpt_image.billing import call_cost
from prefect_gpt_image.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    GptImageError,
    InvalidImageError,
    InvalidResponseError,
    RouteDroppedError,
)
from prefect_gpt_image.images import inspect_image
from prefect_gpt_image.models import ApiLimits, GeneratedImage, ImageFile, ImageRequest, Usage
from prefect_gpt_image.request_bodies import openai_body, rapidapi_body
from prefect_gpt_image.responses import (
    ImageReference,
    error_for_openai_response,
    error_for_response,
    find_images,
    first_url,
    parse_json,
    usage_of,
)
from prefect_gpt_image.retry_policy import DOWNLOAD_ATTEMPTS
from prefect_gpt_image.throttle import throttle_for
from prefect_gpt_image.url_safety import check_image_url, is_local_endpoint

if TYPE_CHECKING:
    import openai

    from prefect_gpt_image.blocks._route import GptImageRoute
    from prefect_gpt_image.blocks.credentials import RapidAPICredentials
    from prefect_gpt_image.blocks.openai_credentials import OpenAICredentials

logger = logging.getLogger(__name__)

DOWNLOAD_READ_TIMEOUT_SECONDS = 30.0
DOWNLOAD_DEADLINE_SECONDS = 120.0
"""A download that trickles is cut off here, whatever its read timeout."""
MAX_REDIRECTS = 5

_http: httpx.Client | None = None
_http_lock = threading.Lock()


def shared_http_client() -> httpx.Client:
    """One connection pool per process: tasks run in threads and share it."""
    global _http
    with _http_lock:
        if _http is None:
            _http = httpx.Client(
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                headers={"user-agent": "prefect-gpt-image"},
            )
        return _http


class GenerationClient(ABC):
    """Generates the images of one request per call, and returns them downloaded and
    checked, with what the call cost.

    Provider URLs expire, so images are fetched at once. The key is sent only to the
    generation endpoint, never to the host serving the image.
    """

    def __init__(self, route: GptImageRoute, *, allow_internal_images: bool | None = None) -> None:
        """`allow_internal_images`: fetch images from internal addresses; by default only
        when the API itself is configured at one (an emulator, an in-house proxy)."""
        self._route = route
        self._spec = route.model_spec()
        self._http = shared_http_client()
        self._throttle = throttle_for(route.endpoint_url, route.api_key.get_secret_value())
        if allow_internal_images is None:
            allow_internal_images = is_local_endpoint(route.endpoint_url)
        self._allow_internal_images = allow_internal_images
        read_timeout = min(DOWNLOAD_READ_TIMEOUT_SECONDS, route.timeout_seconds)
        self._download_timeout = httpx.Timeout(read_timeout, connect=min(10.0, read_timeout))

    def generate(
        self,
        request: ImageRequest,
        limits: ApiLimits | None = None,
        *,
        still_live: Callable[[], bool] | None = None,
    ) -> GeneratedImage:
        """One paid call. `limits` say how busy this process may keep the API (see
        `prefect_gpt_image.throttle`); downloads are not counted against them.
        `still_live` is asked once the call's turn has come: a route dropped while the
        request waited is not called."""
        route = self._route
        with self._throttle.admit(limits) as admission:
            if still_live is not None and not still_live():
                raise RouteDroppedError(f"The route {route.route_name} was dropped.")
            started = time.monotonic()
            try:
                response = self._post(request)
            except httpx.TimeoutException:
                raise APITimeoutError(
                    f"No answer from {route.endpoint_url} within {route.timeout_seconds:g} s. "
                    "Raise timeout_seconds in the credentials block for slow, high-quality "
                    "generations."
                ) from None
            except httpx.TransportError as exc:
                raise APIConnectionError(
                    f"Could not reach {route.endpoint_url}: {type(exc).__name__}: {exc}"
                ) from None
            admission.answered(response.status_code, response.headers)
        logger.debug(
            "POST %s -> %d in %.2f s",
            route.endpoint_url,
            response.status_code,
            time.monotonic() - started,
        )
        if not response.is_success:
            raise self._error(response.status_code, response.headers, response.content)
        # The API answered 2xx: the call is paid for, whatever comes next.
        usage: Usage | None = None
        try:
            payload = parse_json(response.content)
            usage = usage_of(payload)
            return self._images(payload, request, usage)
        except GptImageError as exc:
            exc.billed = True
            exc.billed_usd = call_cost(self._spec, request, request.n, usage)
            raise

    @abstractmethod
    def _post(self, request: ImageRequest) -> httpx.Response:
        """Send the generation request; transport failures raise httpx's errors."""

    @abstractmethod
    def _error(self, status: int, headers: httpx.Headers, body: bytes) -> APIError:
        """The error a non-2xx answer means."""

    def _images(
        self, payload: object, request: ImageRequest, usage: Usage | None
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
            cost_usd=call_cost(self._spec, request, len(files), usage),
            usage=usage,
            more_images=more,
        )

    def _file(self, reference: ImageReference) -> ImageFile:
        cap = self._route.max_image_bytes
        data = reference.data if reference.data is not None else self._download(reference.url)
        if len(data) > cap:
            raise _too_large(len(data), cap)
        info = inspect_image(data)
        return ImageFile(
            data=data,
            media_type=info.media_type,
            sha256=hashlib.sha256(data).hexdigest(),
            width=info.width,
            height=info.height,
        )

    def _download(self, url: str | None) -> bytes:
        """Fetch a paid image, retrying transient failures: it cannot be fetched later."""
        assert url is not None
        last_error: Exception | None = None
        for attempt in range(DOWNLOAD_ATTEMPTS):
            if attempt:
                time.sleep(attempt)
            try:
                return self._download_once(url)
            except (httpx.TransportError, _TransientDownloadError) as exc:
                last_error = exc
                logger.debug("Download of %s failed (%s); attempt %d", url, exc, attempt + 1)
        raise InvalidResponseError(
            f"The generated image could not be downloaded from {url} after "
            f"{DOWNLOAD_ATTEMPTS} attempts: {type(last_error).__name__}: {last_error}"
        )

    def _download_once(self, url: str) -> bytes:
        cap = self._route.max_image_bytes
        deadline = time.monotonic() + DOWNLOAD_DEADLINE_SECONDS
        for _ in range(MAX_REDIRECTS + 1):
            # Redirects are followed by hand, so that every hop is checked.
            check_image_url(url, allow_internal=self._allow_internal_images)
            request = self._http.build_request("GET", url, timeout=self._download_timeout)
            r = self._http.send(request, stream=True)
            try:
                if r.is_redirect and r.next_request is not None:
                    url = str(r.next_request.url)
                    continue
                _check_download_status(r.status_code)
                if int(r.headers.get("content-length") or 0) > cap:
                    raise _too_large(int(r.headers["content-length"]), cap)
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
                return b"".join(chunks)
            finally:
                r.close()
        raise InvalidResponseError(f"The image URL redirected more than {MAX_REDIRECTS} times.")


def _check_download_status(status: int) -> None:
    if status >= 500:
        raise _TransientDownloadError(f"{status} from the image host")
    if status >= 400:
        raise InvalidResponseError(
            f"The generated image's URL answered {status}: it has expired or was never "
            "there. The image must be generated again."
        )


class _TransientDownloadError(APIError):
    retryable = True


def _too_large(size: int, cap: int) -> InvalidImageError:
    return InvalidImageError(
        f"The generated image is larger ({size:,} bytes) than max_image_bytes ({cap:,}) "
        "allows; raise it in the credentials block to accept it."
    )


class RapidAPIClient(GenerationClient):
    """NexaAPI's endpoint on RapidAPI: a JSON POST with the key in `x-rapidapi-key`."""

    _route: RapidAPICredentials

    def _post(self, request: ImageRequest) -> httpx.Response:
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
    off: `prefect_gpt_image.retry_policy` is the only retry policy."""

    _route: OpenAICredentials

    def _post(self, request: ImageRequest) -> httpx.Response:
        import openai

        route = self._route
        body = openai_body(request, route.model, route.default_extras)
        model, prompt = body.pop("model"), body.pop("prompt")
        try:
            raw = _openai_client(route).images.with_raw_response.generate(
                model=model,
                prompt=prompt,
                extra_body=body,
                extra_headers=_auth_headers(route),
                timeout=route.timeout_seconds,
            )
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


_openai_clients: dict[tuple[str, ...], openai.OpenAI] = {}


def _openai_client(route: OpenAICredentials) -> openai.OpenAI:
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
    with _http_lock:
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


def _auth_headers(route: OpenAICredentials) -> dict[str, Any]:
    """Azure OpenAI's `api-key` header instead of the bearer token, where asked."""
    import openai

    if route.auth_header != "api-key":
        return {}
    return {"api-key": route.api_key.get_secret_value(), "Authorization": openai.Omit()}
