"""Reading the API's answers: the image a success points to, the error a failure means.

Providers behind RapidAPI answer in several shapes, and the gateway adds its own
errors in front of theirs, so both readers are deliberately liberal.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from prefect_gpt_image.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    EndpointNotFoundError,
    InvalidResponseError,
    NotSubscribedError,
    PromptRejectedError,
    QuotaExceededError,
    RateLimitedError,
    ServerError,
)

_HTML = re.compile(r"\s*<(!doctype|html|head|body)", re.IGNORECASE)
_HTML_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_IMAGE_LIST_FIELDS = ("images", "output", "data", "results", "artifacts")
_IMAGE_URL_FIELDS = ("url", "image_url", "image")
_INLINE_FIELDS = ("b64_json", "base64", "image_base64")
_NESTED_FIELDS = ("result", "response", "image")


@dataclass(frozen=True)
class ImageReference:
    """Where a successful answer put the image: a URL to fetch, or the bytes inline."""

    url: str | None = None
    data: bytes | None = None


def find_image(payload: Any) -> ImageReference:
    """The first image in a successful answer, whatever shape it came in."""
    found = _search(payload, depth=0)
    if found is None:
        raise InvalidResponseError(
            f"The API answered 200 but with no image in it: {_preview(payload)}"
        )
    return found


def _search(node: Any, depth: int) -> ImageReference | None:
    if depth > 4:
        return None
    if isinstance(node, str):
        return _reference_from_string(node)
    if isinstance(node, list):
        for item in node:
            if (found := _search(item, depth + 1)) is not None:
                return found
        return None
    if not isinstance(node, Mapping):
        return None
    for field in _INLINE_FIELDS:
        if isinstance(node.get(field), str):
            return ImageReference(data=_decode_base64(node[field]))
    for field in _IMAGE_URL_FIELDS:
        if isinstance(value := node.get(field), str) and (ref := _reference_from_string(value)):
            return ref
    for field in (*_IMAGE_LIST_FIELDS, *_NESTED_FIELDS):
        if field in node and (found := _search(node[field], depth + 1)) is not None:
            return found
    return None


def _reference_from_string(value: str) -> ImageReference | None:
    if value.startswith(("http://", "https://")):
        return ImageReference(url=value)
    if value.startswith("data:image/") and "," in value:
        return ImageReference(data=_decode_base64(value.split(",", 1)[1]))
    return None


def _decode_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidResponseError("The API's inline image is not valid base64.") from exc


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise InvalidResponseError(
            f"The API answered 200 with a body that is not JSON: {_preview(body)}"
        ) from exc


# --- Errors ---------------------------------------------------------------------------


def error_for_response(status: int, headers: Mapping[str, str], body: bytes) -> APIError:
    """The error a non-2xx answer means, with a message that says what to do."""
    detail = _error_detail(body)
    said = f" The API said: {detail}" if detail else ""
    lowered = detail.lower()
    if status == 401:
        return AuthenticationError(
            "RapidAPI rejected the API key (401). Check the key in the RapidAPICredentials "
            "block or RAPIDAPI_KEY; it is the x-rapidapi-key shown in RapidAPI's dashboard." + said,
            status_code=status,
        )
    if status == 403:
        return NotSubscribedError(
            "The API key is not subscribed to this API (403). Subscribe to the API on "
            "RapidAPI with the app this key belongs to." + said,
            status_code=status,
        )
    if status == 404:
        return EndpointNotFoundError(
            "No API answers at this host and path (404). Check api_host, base_url and "
            "path in the credentials block: the model may have been retired." + said,
            status_code=status,
        )
    if status == 429:
        if "quota" in lowered:
            return QuotaExceededError(
                "The RapidAPI plan's quota is spent (429). Retrying cannot help and may "
                "incur overage charges: upgrade the plan or wait for the quota to reset." + said,
                status_code=status,
            )
        return RateLimitedError(
            "Rate limited by RapidAPI (429)." + said,
            retry_after=retry_after_seconds(headers),
        )
    if status >= 500:
        return ServerError(
            f"The API or RapidAPI's gateway failed ({status})." + said,
            status_code=status,
            retry_after=retry_after_seconds(headers),
        )
    if status in (400, 422) and ("policy" in lowered or "safety" in lowered):
        return PromptRejectedError(
            f"The model refused the prompt ({status}). Rephrase it." + said,
            status_code=status,
        )
    return BadRequestError(
        f"The API refused the request ({status}). Check the size and extras." + said,
        status_code=status,
    )


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """How long the server asked us to wait: Retry-After, else the gateway's reset time."""
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    for name in ("x-ratelimit-requests-reset", "x-ratelimit-reset"):
        try:
            seconds = float(headers.get(name, ""))
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def _error_detail(body: bytes) -> str:
    """The human part of an error body: JSON message fields, or text without markup."""
    try:
        payload = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace")
        if _HTML.match(text):  # a gateway's page: its title says it all, markup nothing
            title = _HTML_TITLE.search(text)
            text = title.group(1) if title else ""
        return " ".join(text.split())[:300]
    if isinstance(payload, Mapping):
        error = payload.get("error")
        if isinstance(error, Mapping):
            return str(error.get("message") or error.get("code") or "")[:300]
        for field in ("message", "error", "detail"):
            if isinstance(payload.get(field), str):
                return str(payload[field])[:300]
    return _preview(payload)


def _preview(payload: Any) -> str:
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else repr(payload)
    return text if len(text) <= 200 else text[:200] + "..."
