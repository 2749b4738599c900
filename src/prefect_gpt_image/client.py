"""The HTTP client for the generation endpoint: one call in, one checked image out."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import httpx

from prefect_gpt_image.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    GptImageError,
    InvalidImageError,
    InvalidResponseError,
)
from prefect_gpt_image.images import inspect_image
from prefect_gpt_image.models import ApiLimits, GeneratedImage, ImageRequest
from prefect_gpt_image.responses import error_for_response, find_image, parse_json
from prefect_gpt_image.retry_policy import DOWNLOAD_ATTEMPTS
from prefect_gpt_image.throttle import throttle_for
from prefect_gpt_image.url_safety import check_image_url, is_local_endpoint

if TYPE_CHECKING:
    from prefect_gpt_image.blocks.credentials import RapidAPICredentials

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


def request_body(request: ImageRequest, credentials: RapidAPICredentials) -> dict[str, Any]:
    """The JSON body for one request: block defaults, then the request's own fields."""
    return {
        **credentials.default_extras,
        **request.extras,
        "prompt": request.prompt,
        "width": request.width,
        "height": request.height,
    }


class GptImageClient:
    """Generates one image per call and returns it downloaded and checked.

    Provider URLs expire, so the image is fetched at once. The key is sent only to
    the generation endpoint, never to the host serving the image.
    """

    def __init__(
        self, credentials: RapidAPICredentials, *, allow_internal_images: bool | None = None
    ) -> None:
        """`allow_internal_images`: fetch images from internal addresses; by default only
        when the API itself is configured at one (an emulator, an in-house proxy)."""
        self._credentials = credentials
        self._http = shared_http_client()
        self._throttle = throttle_for(
            credentials.endpoint_url, credentials.api_key.get_secret_value()
        )
        if allow_internal_images is None:
            allow_internal_images = is_local_endpoint(credentials.endpoint_url)
        self._allow_internal_images = allow_internal_images
        read_timeout = min(DOWNLOAD_READ_TIMEOUT_SECONDS, credentials.timeout_seconds)
        self._download_timeout = httpx.Timeout(read_timeout, connect=min(10.0, read_timeout))

    def generate(self, request: ImageRequest, limits: ApiLimits | None = None) -> GeneratedImage:
        """One paid generation. `limits` say how busy this process may keep the API
        (see `prefect_gpt_image.throttle`); the download is not counted against them."""
        creds = self._credentials
        with self._throttle.admit(limits) as admission:
            started = time.monotonic()
            try:
                response = self._http.post(
                    creds.endpoint_url,
                    json=request_body(request, creds),
                    headers={
                        "x-rapidapi-key": creds.api_key.get_secret_value(),
                        "x-rapidapi-host": creds.api_host,
                    },
                    timeout=httpx.Timeout(creds.timeout_seconds, connect=10.0),
                )
            except httpx.TimeoutException:
                raise APITimeoutError(
                    f"No answer from {creds.endpoint_url} within {creds.timeout_seconds:g} s. "
                    "Raise timeout_seconds in the credentials block for slow, high-quality "
                    "generations."
                ) from None
            except httpx.TransportError as exc:
                raise APIConnectionError(
                    f"Could not reach {creds.endpoint_url}: {type(exc).__name__}: {exc}"
                ) from None
            admission.answered(response.status_code, response.headers)
        logger.debug(
            "POST %s -> %d in %.2f s",
            creds.endpoint_url,
            response.status_code,
            time.monotonic() - started,
        )
        if not response.is_success:
            raise error_for_response(response.status_code, response.headers, response.content)
        try:
            return self._image(response.content, request)
        except GptImageError as exc:
            exc.billed = True  # the API answered 2xx: the generation is paid for
            raise

    def _image(self, body: bytes, request: ImageRequest) -> GeneratedImage:
        creds = self._credentials
        reference = find_image(parse_json(body))
        data = reference.data if reference.data is not None else self._download(reference.url)
        if len(data) > creds.max_image_bytes:
            raise _too_large(len(data), creds.max_image_bytes)
        info = inspect_image(data)
        return GeneratedImage(
            data=data,
            media_type=info.media_type,
            sha256=hashlib.sha256(data).hexdigest(),
            width=info.width,
            height=info.height,
            request=request,
            model=creds.model,
            source_url=reference.url,
            generated_at=datetime.now(timezone.utc),
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
        cap = self._credentials.max_image_bytes
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
