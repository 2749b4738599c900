"""Reading the API's answers: the image a success points to, the error a failure means.

Providers behind RapidAPI answer in several shapes, and the gateway adds its own
errors in front of theirs, so both readers are deliberately liberal.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefect_gpt_image._rate_limit_headers import retry_after_seconds
from prefect_gpt_image.errors import (
    AccessDeniedError,
    APIError,
    AuthenticationError,
    BadRequestError,
    EndpointNotFoundError,
    InvalidResponseError,
    ModelNotFoundError,
    NotSubscribedError,
    PromptRejectedError,
    QuotaExceededError,
    RateLimitedError,
    ServerError,
)
from prefect_gpt_image.models import Usage

_HTML = re.compile(r"\s*<(!doctype|html|head|body)", re.IGNORECASE)
_HTML_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_IMAGE_LIST_FIELDS = ("images", "output", "data", "results", "artifacts")
_IMAGE_URL_FIELDS = ("url", "image_url", "image")
_INLINE_FIELDS = ("b64_json", "base64", "image_base64")
_NESTED_FIELDS = ("result", "response", "image")


@dataclass(frozen=True)
class InlineImage:
    """An image an answer carried inline, as base64 text, not yet decoded.

    An answer can carry far more than the caller accepts (`max_image_bytes`): `size` is
    known from the text's length alone, and `decoded()` is called only once it is known to
    be within the cap.
    """

    text: str = dataclasses.field(repr=False)
    start: int = 0
    """Where the base64 text starts in `text` (after a data: URL's comma)."""
    media_type: str | None = None
    """The media type a data: URL declared, if it declared one."""

    @property
    def size(self) -> int:
        """The bytes the text decodes to: 3 per 4 characters, less the padding."""
        length = len(self.text) - self.start
        padding = 0
        if length >= 4 and length % 4 == 0:
            padding = (self.text[-1] == "=") + (self.text[-2] == "=")
        return (length + 3) // 4 * 3 - padding

    def decoded(self) -> bytes:
        """The image's bytes, or InvalidResponseError if the text is not base64."""
        try:
            return base64.b64decode(self.text[self.start :], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidResponseError("The API's inline image is not valid base64.") from None


@dataclass(frozen=True)
class ImageReference:
    """Where a successful answer put the image: a URL to fetch, or the image inline
    (`InlineImage`, decoded by the caller once its size is known to be acceptable)."""

    url: str | None = None
    data: bytes | InlineImage | None = None


def find_image(payload: Any) -> ImageReference:
    """The first image in a successful answer, whatever shape it came in."""
    found = _search(payload, depth=0)
    if found is None:
        raise InvalidResponseError(
            f"The API answered 200 but with no image in it: {_preview(payload)}"
        )
    return found


def find_images(payload: Any) -> list[ImageReference]:
    """Every image in a successful answer: each entry of its image list, or the one image
    it points to. A paid image is never left behind."""
    if isinstance(payload, Mapping):
        for field in _IMAGE_LIST_FIELDS:
            items = payload.get(field)
            if isinstance(items, list) and len(items) > 1:
                found = [ref for item in items if (ref := _search(item, depth=1)) is not None]
                if found:
                    return found
    return [find_image(payload)]


def first_url(payload: Any) -> str | None:
    """Where the answer's first image was served, if it was served by URL."""
    found = _search(payload, depth=0)
    return found.url if found is not None else None


def usage_of(payload: Any) -> Usage | None:
    """The tokens the answer says the call used (OpenAI's `usage`), if it says."""
    usage = payload.get("usage") if isinstance(payload, Mapping) else None
    if not isinstance(usage, Mapping):
        return None
    details = usage.get("input_tokens_details")
    details = details if isinstance(details, Mapping) else {}
    cached = details.get("cached_tokens_details")
    cached = cached if isinstance(cached, Mapping) else {}
    try:
        text, image = int(details.get("text_tokens") or 0), int(details.get("image_tokens") or 0)
        cached_text, cached_image = (
            int(cached.get("text_tokens") or 0),
            int(cached.get("image_tokens") or 0),
        )
        if not cached_text + cached_image and (total := int(details.get("cached_tokens") or 0)):
            # Cached, but not said of which kind: text first, whose discount is the smaller,
            # so that the cost is never reported below what was billed.
            cached_text = min(total, text)
            cached_image = min(total - cached_text, image)
        return Usage(
            input_tokens=int(usage.get("input_tokens") or 0),
            output_tokens=int(usage.get("output_tokens") or 0),
            text_input_tokens=text,
            image_input_tokens=image,
            cached_text_input_tokens=cached_text,
            cached_image_input_tokens=cached_image,
        )
    except (TypeError, ValueError):
        return None


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
    if value.startswith("data:image/") and (comma := value.find(",")) > 0:
        declared = value[len("data:") : min(comma, len("data:") + 100)].split(";", 1)[0]
        return ImageReference(data=InlineImage(value, start=comma + 1, media_type=declared))
    return None


def _decode_base64(text: str) -> InlineImage:
    """The inline image `text` carries, decoded only when read (see `InlineImage`)."""
    return InlineImage(text)


def parse_json(body: bytes) -> Any:
    """The answer's JSON; NaN, Infinity and numbers too large for a float read as null.

    InvalidResponseError for a body that is not JSON, or is nested too deep to read; the
    message says what the body was (its length and kind), never what it held."""
    try:
        return json.loads(body, parse_constant=_no_number, parse_float=_finite_float)
    except RecursionError:
        raise InvalidResponseError(
            f"The API answered 200 with JSON nested too deep to read ({len(body):,} bytes)."
        ) from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidResponseError(
            f"The API answered 200 with a body that is not JSON ({_preview(body)})."
        ) from None


def _no_number(name: str) -> None:
    return None


def _finite_float(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


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
    if status == 410:
        return ModelNotFoundError(
            "The endpoint says the model is gone (410): move the block to its successor "
            "(api_host, path, model) or give a fallback route." + said,
            status_code=status,
        )
    if status == 402:
        return QuotaExceededError(
            "The RapidAPI account's credit is spent (402): top it up or upgrade the plan." + said,
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


def _error_detail(body: bytes) -> str:
    """The human part of an error body: JSON message fields, or text without markup."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's limit
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
    """What an answer held, for an error message, without its content: a body that is not
    JSON by its length and kind, JSON by its shape (field names and the types of values,
    never the values), cut at 200 characters."""
    if isinstance(payload, (bytes, bytearray)):
        return _kind_of_body(bytes(payload))
    text = _shape(payload, depth=0)
    return text if len(text) <= 200 else text[:200] + "..."


def _kind_of_body(body: bytes) -> str:
    if not body.strip():
        return f"{len(body):,} bytes, empty" if body else "an empty body"
    head = body[:512].lstrip()
    if _HTML.match(head.decode("utf-8", "replace")):
        kind = "an HTML page"
    else:
        try:
            head.decode("utf-8")
            kind = "text"
        except UnicodeDecodeError as exc:  # a character cut at 512 bytes is still text
            kind = "text" if exc.start >= len(head) - 3 else "binary data"
    return f"{len(body):,} bytes, {kind}"


_SHAPE_DEPTH = 3
_SHAPE_FIELDS = 12


def _shape(node: Any, depth: int) -> str:
    """`node`'s layout: objects with their field names, arrays by their first item and
    length, and every value by its JSON type."""
    if isinstance(node, Mapping):
        if not node:
            return "{}"
        if depth >= _SHAPE_DEPTH:
            return "{...}"
        fields = [
            f"{_field_name(key)}: {_shape(value, depth + 1)}"
            for key, value in list(node.items())[:_SHAPE_FIELDS]
        ]
        more = ", ..." if len(node) > _SHAPE_FIELDS else ""
        return "{" + ", ".join(fields) + more + "}"
    if isinstance(node, list):
        if not node:
            return "[]"
        if depth >= _SHAPE_DEPTH:
            return "[...]"
        first = _shape(node[0], depth + 1)
        return f"[{first}]" if len(node) == 1 else f"[{first}, ... {len(node)} items]"
    if isinstance(node, str):
        return "string"
    if isinstance(node, bool):
        return "boolean"
    if isinstance(node, (int, float)):
        return "number"
    return "null" if node is None else type(node).__name__


def _field_name(key: object) -> str:
    name = json.dumps(str(key))
    return name if len(name) <= 42 else name[:40] + '..."'


def error_for_openai_response(
    status: int, headers: Mapping[str, str], body: bytes, model: str
) -> APIError:
    """The error an OpenAI-protocol answer means, read from every signal it carries.

    OpenAI names the problem in `error.code`; Azure OpenAI names some in its own codes
    (`contentFilter`, `DeploymentNotFound`, an `inner_error`), and gateways such as LiteLLM
    keep OpenAI's message but set `code` to the HTTP status and `type` to their own
    (`throttling_error`). So the status, every code, the type and the message are read
    together: a spent quota is a spent quota whichever of them says so.
    """
    said_by = _signals(body)
    detail = _error_detail(body)
    said = f" The API said: {detail}" if detail else ""
    shown = f"({status}{_code(said_by.code)})"
    if said_by.rejects_key(status):
        return AuthenticationError(
            f"The API rejected the key {shown}. Check api_key in the OpenAICredentials "
            "block, and auth_header ('api-key' for Azure OpenAI)." + said,
            status_code=status,
        )
    if status == 403:
        return AccessDeniedError(
            f"The key may not use this API or model {shown}." + said, status_code=status
        )
    if status in (404, 410) or said_by.has_no_model():
        return ModelNotFoundError(
            f"This route does not serve {model} {shown}: the model is retired, misspelt, or "
            "not deployed here. Set `model` in the credentials block to its successor (or to "
            "the name this endpoint gives it), or give a fallback route." + said,
            status_code=status,
        )
    if status == 402 or said_by.spent_quota():
        return QuotaExceededError(
            f"The account's quota or credit is spent {shown}. Retrying cannot help: check "
            "the plan and billing details." + said,
            status_code=status,
        )
    if status < 500 and status != 429 and said_by.refuses_content():
        return PromptRejectedError(
            f"The model refused the prompt {shown}. Rephrase it." + said,
            status_code=status,
        )
    if status == 429:
        return RateLimitedError(
            f"Rate limited {shown}." + said,
            retry_after=retry_after_seconds(headers) or said_by.retry_after(),
        )
    if status >= 500:
        return ServerError(
            f"The API failed ({status})." + said,
            status_code=status,
            retry_after=retry_after_seconds(headers),
        )
    return BadRequestError(f"The API refused the request {shown}." + said, status_code=status)


_KEY_REJECTED_CODES = frozenset({"invalid_api_key", "invalid_key", "unauthorized"})
_KEY_REJECTED_TYPES = frozenset({"auth_error", "authentication_error"})
_KEY_REJECTED_WORDS = (
    "incorrect api key",  # OpenAI
    "invalid subscription key",  # Azure
    "invalid proxy server token",  # LiteLLM with a key database
    "no connected db",  # LiteLLM without one: a virtual key it cannot check, as 400
    "authentication error",  # LiteLLM
)
_NO_MODEL_CODES = frozenset({"model_not_found", "deploymentnotfound"})
_NO_MODEL_WORDS = (
    "invalid model name passed in model=",  # LiteLLM: a model it does not host, as 400
    "does not exist or you do not have access to it",  # OpenAI
    "deployment for this resource does not exist",  # Azure
)
_QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "budget_exceeded"})
_QUOTA_WORDS = (
    "exceeded your current quota",  # OpenAI's message, kept by gateways
    "insufficient_quota",  # a gateway that quotes the upstream error's code
    "billing hard limit",
    "budget has been exceeded",  # LiteLLM: the key's or team's budget is spent
)
_REFUSAL_CODES = frozenset(
    {"moderation_blocked", "content_policy_violation", "content_filter", "contentfilter"}
)
_REFUSAL_INNER_CODES = frozenset({"responsibleaipolicyviolation"})
_REFUSAL_WORDS = (
    "rejected by the safety system",  # OpenAI, and LiteLLM passing it on
    "as a result of our safety system",  # Azure
    "content management policy",  # Azure
    "contentpolicyviolationerror",  # LiteLLM's name for it
    "content_policy_violation",
)
_RETRY_IN = re.compile(r"(?:try again|retry after) (?:in )?([0-9]+(?:\.[0-9]+)?) ?s", re.IGNORECASE)
"""A wait named in the message: LiteLLM's "Try again in 5 seconds", Azure's "Please retry
after 6 seconds"."""


@dataclass(frozen=True)
class _Signals:
    """What an error answer says, besides its status: its codes, type and message."""

    code: str | None = None
    """`error.code` as sent (a gateway's may be the status itself)."""
    codes: frozenset[str] = frozenset()
    """Every code, lowercased: `error.code`, Azure's inner error's, and `type`."""
    message: str = ""
    """The message, lowercased and whole."""

    def rejects_key(self, status: int) -> bool:
        return (
            status == 401
            or bool(self.codes & (_KEY_REJECTED_CODES | _KEY_REJECTED_TYPES))
            or _says(self.message, _KEY_REJECTED_WORDS)
        )

    def has_no_model(self) -> bool:
        return bool(self.codes & _NO_MODEL_CODES) or _says(self.message, _NO_MODEL_WORDS)

    def spent_quota(self) -> bool:
        return bool(self.codes & _QUOTA_CODES) or _says(self.message, _QUOTA_WORDS)

    def refuses_content(self) -> bool:
        return bool(self.codes & (_REFUSAL_CODES | _REFUSAL_INNER_CODES)) or _says(
            self.message, _REFUSAL_WORDS
        )

    def retry_after(self) -> float | None:
        found = _RETRY_IN.search(self.message)
        return float(found.group(1)) if found else None


def _says(message: str, words: tuple[str, ...]) -> bool:
    return any(word in message for word in words)


def _signals(body: bytes) -> _Signals:
    """The codes, type and message of an error body in OpenAI's shape, Azure's or a
    gateway's; nothing for a body in none of them."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return _Signals(message=body[:2000].decode("utf-8", "replace").lower())
    error = payload.get("error") if isinstance(payload, Mapping) else None
    if isinstance(error, str):
        return _Signals(message=error.lower())
    if not isinstance(error, Mapping):
        message = payload.get("message") if isinstance(payload, Mapping) else None
        return _Signals(message=message.lower() if isinstance(message, str) else "")
    inner = error.get("inner_error") or error.get("innererror")
    fields = [error.get("code"), error.get("type")]
    if isinstance(inner, Mapping):
        fields.append(inner.get("code"))
    code = error.get("code")
    message = error.get("message")
    return _Signals(
        code=str(code) if isinstance(code, (str, int)) and code != "" else None,
        codes=frozenset(str(f).lower() for f in fields if isinstance(f, (str, int))),
        message=message.lower() if isinstance(message, str) else "",
    )


def _code(code: str | None) -> str:
    """`, code` for a code that says more than the status; a gateway's code is often
    only the status again."""
    return f", {code}" if code and not code.isdigit() else ""
