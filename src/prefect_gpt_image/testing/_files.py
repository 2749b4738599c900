"""OpenAI's Files API as the emulator serves it: uploads, listings, downloads and deletes,
with files kept on disk.

A batch's input is a file uploaded here, and its output and error files are written here, so
a thousand-image output file costs disk, not memory: contents live in a temporary directory
that the emulator owns and are sent in chunks. The listing helpers (`_page`, `_query`) and
expiry policies (`_lifetime`) are the API's own, shared with the Batches API.
"""

from __future__ import annotations

import secrets
import shutil
import string
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs

from prefect_gpt_image.testing._openai_common import (
    _choice,
    _form_parts,
    _form_value,
    _invalid,
    _json_type,
    _openai_error,
    _Refused,
)
from prefect_gpt_image.testing._server import _Reply

_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
_UPLOAD_FIELDS = frozenset({"purpose", "expires_after[anchor]", "expires_after[seconds]"})
_FILE_SECONDS = 30 * 24 * 3600
"""Batch input and output files expire after 30 days unless told otherwise."""
_EXPIRY_RANGE = (3600, 30 * 24 * 3600)
_ALPHANUMERIC = string.ascii_letters + string.digits


def _now() -> int:
    return int(time.time())


def _file_id() -> str:
    return "file-" + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(22))


@dataclass(frozen=True)
class _File:
    """An uploaded or written file; its bytes are at `path`."""

    id: str
    filename: str
    purpose: str
    size: int
    created_at: int
    expires_at: int | None
    path: Path

    def describe(self) -> dict[str, Any]:
        """The File object (OpenAIFile)."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.size,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


class _Files:
    """Files by id, their bytes in a temporary directory made on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, _File] = {}
        self._directory: Path | None = None

    def scratch(self, name: str) -> Path:
        """A path in the directory for a file about to be written, then `adopt`ed."""
        with self._lock:
            if self._directory is None:
                self._directory = Path(tempfile.mkdtemp(prefix="gpt-image-emulator-files-"))
            return self._directory / f"{name}.{secrets.token_hex(8)}"

    def add(self, data: bytes, filename: str, purpose: str, lifetime: int | None) -> _File:
        path = self.scratch("upload")
        path.write_bytes(data)
        return self.adopt(path, filename, purpose, lifetime)

    def adopt(self, path: Path, filename: str, purpose: str, lifetime: int | None) -> _File:
        """Register the file written at `path`, which it then belongs to."""
        created = _now()
        file = _File(
            _file_id(),
            filename,
            purpose,
            path.stat().st_size,
            created,
            None if lifetime is None else created + lifetime,
            path,
        )
        with self._lock:
            self._files[file.id] = file
        return file

    def get(self, file_id: str) -> _File:
        """The file, or the API's 404 (raised as _Refused)."""
        with self._lock:
            file = self._files.get(file_id)
        if file is None:
            raise _Refused(_openai_error(404, f"No such File object: {file_id}", param="id"))
        return file

    def all(self) -> list[_File]:
        with self._lock:
            return list(self._files.values())

    def delete(self, file_id: str) -> None:
        file = self.get(file_id)
        with self._lock:
            self._files.pop(file_id, None)
        file.path.unlink(missing_ok=True)  # a download under way keeps its open handle

    def open(self, file_id: str) -> BinaryIO:
        file = self.get(file_id)
        try:
            return file.path.open("rb")
        except FileNotFoundError:  # deleted meanwhile
            raise _Refused(
                _openai_error(404, f"No such File object: {file_id}", param="id")
            ) from None

    def clear(self) -> None:
        """Forget every file and delete the directory; downloads under way keep their open
        handles, and the next file makes a new directory."""
        with self._lock:
            directory, self._directory, self._files = self._directory, None, {}
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    # -- the endpoints ------------------------------------------------------------------------

    def upload(self, raw: bytes, content_type: str, batch_max_bytes: int) -> dict[str, Any]:
        """`POST .../files`: a multipart form with `file` and `purpose`; a batch's input file
        is JSONL of at most `batch_max_bytes`. Raises _Refused as the API refuses."""
        parts = _form_parts(raw, content_type)
        uploads = [part for part in parts if part.name == "file"]
        fields = {part.name: _form_value(part) for part in parts if part.name != "file"}
        for name in fields:
            if name not in _UPLOAD_FIELDS:
                raise _invalid(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
        for name, present in (("file", bool(uploads)), ("purpose", "purpose" in fields)):
            if not present:
                message = f"Missing required parameter: '{name}'."
                raise _invalid(message, name, "missing_required_parameter")
        if len(uploads) > 1:
            raise _invalid("Invalid 'file': expected one file, but got several.", "file")
        purpose = _choice(fields, "purpose", _PURPOSES)
        upload = uploads[0]
        filename = upload.filename or "upload"
        expiry = None
        if any(name.startswith("expires_after[") for name in fields):
            expiry = {
                "anchor": fields.get("expires_after[anchor]"),
                "seconds": fields.get("expires_after[seconds]"),
            }
        lifetime = _lifetime(expiry, "expires_after")
        if purpose == "batch":
            if not filename.endswith(".jsonl"):
                raise _invalid(
                    "Invalid file format for Batch API. Must be .jsonl",
                    "file",
                    "invalid_file_format",
                )
            if len(upload.data) > batch_max_bytes:
                message = (
                    f"The batch input file is larger than the {batch_max_bytes} bytes maximum. "
                    "Please try again with a smaller batch."
                )
                raise _invalid(message, "file", "file_too_large")
            lifetime = _FILE_SECONDS if lifetime is None else lifetime
        return self.add(upload.data, filename, purpose, lifetime).describe()

    def listing(self, query: dict[str, str]) -> dict[str, Any]:
        """`GET .../files`: a page of files, newest first unless `order=asc`."""
        files = [file.describe() for file in self.all()]
        if "purpose" in query:
            files = [file for file in files if file["purpose"] == query["purpose"]]
        if _choice(query, "order", ("asc", "desc"), "desc") == "desc":
            files.reverse()
        return _page(files, query, 10_000, 10_000)

    def download(self, file_id: str) -> _Reply:
        """`GET .../files/{id}/content`: the bytes, streamed from disk."""
        name = self.get(file_id).filename.replace('"', "")
        disposition = ("content-disposition", f'attachment; filename="{name}"')
        stream = self.open(file_id)
        return _Reply(200, b"", "application/octet-stream", (disposition,), stream)


def _query(query: str) -> dict[str, str]:
    return {name: values[-1] for name, values in parse_qs(query).items()}


def _page(
    items: list[dict[str, Any]], query: dict[str, str], most: int, default: int
) -> dict[str, Any]:
    """One page of `items` (already in the list's order) from `after`, as the API pages."""
    text = query.get("limit", str(default))
    if not text.lstrip("-").isdigit():
        message = f"Invalid 'limit': expected an integer, but got '{text}' instead."
        raise _invalid(message, "limit", "invalid_type")
    limit = int(text)
    if not 1 <= limit <= most:
        message = f"Invalid 'limit': expected an integer from 1 to {most}, but got {limit}."
        raise _invalid(message, "limit")
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


def _lifetime(value: object, param: str) -> int | None:
    """Seconds from an `expires_after` policy (`anchor` "created_at", `seconds` within
    an hour to 30 days), or None if none was given."""
    if value is None:
        return None
    if not isinstance(value, dict):
        message = f"Invalid type for '{param}': expected an object, but got {_json_type(value)}."
        raise _invalid(message, param, "invalid_type")
    _choice(value, "anchor", ("created_at",), default="")
    seconds = value.get("seconds")
    if isinstance(seconds, str) and seconds.isdigit():  # a form field
        seconds = int(seconds)
    low, high = _EXPIRY_RANGE
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not low <= seconds <= high:
        message = f"Invalid '{param}.seconds': expected an integer from {low} to {high}."
        raise _invalid(message, f"{param}.seconds")
    return seconds
