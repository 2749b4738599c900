"""What every OpenAI endpoint the emulator serves shares: the error body, the refusal of a
parameter's type or value in the API's own words, the request id, and multipart forms.

The Images API (generations, edits) and the Files and Batches APIs refuse requests alike;
keeping those words in one place keeps the two modules from drifting apart, and lets a batch
refuse a request line exactly as the synchronous endpoint refuses the same request.
"""

from __future__ import annotations

import email.message
import email.parser
import json
import re
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from prefect_gpt_image.testing._server import _json, _Reply

_BAD_JSON = (
    "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
    "payload: send the request with a JSON body and Content-Type: application/json."
)

_MAX_PARTS = 64
_MAX_PART_HEAD = 16 * 1024
_MAX_FIELD = 256 * 1024
_FORM_INTEGER = re.compile(r"-?[0-9]{1,9}")


class _Refused(Exception):
    """Raised while reading an OpenAI request that must be answered `reply` instead."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _openai_error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> _Reply:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return _json(status, {"error": error}, headers)


def _invalid(message: str, param: str, code: str = "invalid_value") -> _Refused:
    return _Refused(_openai_error(400, message, param=param, code=code))


def _refusal(message: str, code: str | None = None) -> _Refused:
    """A 400 about the request as a whole, not one parameter."""
    return _Refused(_openai_error(400, message, code=code))


def _request_id() -> str:
    """An `x-request-id` as OpenAI writes it."""
    return f"req_{secrets.token_hex(16)}"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _listed(values: Sequence[str]) -> str:
    quoted = [f"'{value}'" for value in values]
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def _string(body: dict[str, Any], name: str, default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        got = _json_type(value)
        message = f"Invalid type for '{name}': expected a string, but got {got} instead."
        raise _invalid(message, name, "invalid_type")
    return value


def _choice(body: dict[str, Any], name: str, choices: Sequence[str], default: str = "auto") -> str:
    """The string `name` of `body`, `default` if absent; raises _Refused unless in `choices`."""
    value = _string(body, name, default)
    if value not in choices:
        raise _invalid(f"Invalid value: '{value}'. Supported values are: {_listed(choices)}.", name)
    return value


# -- multipart forms --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One part of a multipart/form-data body."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def _malformed(why: str) -> _Refused:
    return _Refused(_openai_error(400, f"Could not parse the multipart form body: {why}."))


def _form_parts(raw: bytes, content_type: str) -> list[_Part]:
    """The parts of a multipart/form-data body; raises _Refused for anything else.

    Split by hand rather than with `email`, which would copy a 50 MB upload several times;
    only each part's few header lines go through the standard library's parser.
    """
    header = email.message.Message()
    header["content-type"] = content_type
    if header.get_content_type() != "multipart/form-data":
        message = f"Invalid Content-Type header ({content_type}), expected multipart/form-data."
        raise _Refused(_openai_error(400, message))
    boundary = header.get_boundary()
    if not boundary:
        raise _malformed("the Content-Type header has no boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    start = 0 if raw.startswith(delimiter[2:]) else raw.find(delimiter)
    if start < 0:
        raise _malformed("no part begins with the boundary")
    position = start + len(delimiter) - (2 if start == 0 else 0)
    parts: list[_Part] = []
    while not raw.startswith(b"--", position):
        if len(parts) == _MAX_PARTS:
            raise _malformed(f"more than {_MAX_PARTS} parts")
        end = raw.find(delimiter, position)
        if end < 0 or not raw.startswith(b"\r\n", position):
            raise _malformed("a part is cut short")
        head_end = raw.find(b"\r\n\r\n", position, min(end, position + _MAX_PART_HEAD))
        if head_end < 0:
            raise _malformed("a part's headers do not end in a blank line")
        headers = email.parser.BytesHeaderParser().parsebytes(raw[position + 2 : head_end])
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise _malformed("a part has no Content-Disposition name")
        filename = headers.get_filename()
        media_type = headers.get_content_type() if "content-type" in headers else None
        parts.append(_Part(name, filename, media_type, raw[head_end + 4 : end]))
        position = end + len(delimiter)
    return parts


def _form_value(part: _Part, integers: Collection[str] = ()) -> object:
    """A text field as the JSON value it stands for, so that JSON bodies' checks apply: the
    fields named in `integers` as numbers when they are, `stream` as a boolean. A file where
    text belongs becomes an object, which they refuse."""
    if part.filename is not None:
        return {"filename": part.filename, "bytes": len(part.data)}
    if len(part.data) > _MAX_FIELD:
        message = f"Invalid '{part.name}': a form field may hold at most {_MAX_FIELD} bytes."
        raise _invalid(message, part.name, "string_above_max_length")
    try:
        text = part.data.decode()
    except UnicodeDecodeError:
        raise _invalid(f"Invalid '{part.name}': not UTF-8 text.", part.name) from None
    if part.name in integers and _FORM_INTEGER.fullmatch(text):
        return int(text)
    if part.name == "stream" and text in ("true", "false"):
        return text == "true"
    return text


def _parsed_json(raw: bytes) -> dict[str, Any]:
    """A JSON object body; raises _Refused for anything else."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _Refused(_openai_error(400, _BAD_JSON)) from None
    if not isinstance(body, dict):
        raise _refusal(f"Expected a JSON object, but got {_json_type(body)}.")
    return body
