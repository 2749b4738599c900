"""The emulator's HTTP plumbing: a threaded server on loopback, its request handler, the
answers it sends, and the images it hosts under `/images/`.

Kept apart from the protocols, so that they only decide what to answer: this module moves
bytes between the socket and those decisions. It reads a POST body up to `_MAX_BODY` (a
gateway's 413 above), streams a file from disk in chunks, can close a connection without an
answer (`_DROPPED`), serves the images answers link to as a CDN or bucket would, and answers
two test controls without a key: `GET /__emulator__/stats` and `POST /__emulator__/reset`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO
from urllib.parse import urlsplit

_STREAM_CHUNK = 1024**2
"""Bytes per write of a file sent from disk."""

_STATS_PATH = "/__emulator__/stats"
_RESET_PATH = "/__emulator__/reset"

_MAX_BODY = 256 * 1024**2
"""Largest POST body read: room for an image past the 50 MB limit, so the API's own 400 for it
can be tested, without letting one request take gigabytes. Larger ones get a gateway's 413."""


@dataclass(frozen=True)
class _Reply:
    """An answer to send; `stream`, when set, is an open file sent in chunks instead of `body`
    (a batch's output file, which may hold a thousand images) and closed once sent."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    stream: BinaryIO | None = None


_DROPPED = _Reply(0, b"")
"""Not an answer: the connection is closed without one."""


def _json(status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    return _Reply(status, json.dumps(payload).encode(), headers=headers)


def _message(status: int, message: str) -> _Reply:
    """An error in the words of RapidAPI's gateway."""
    return _json(status, {"message": message})


def _error(status: int, code: str, message: str) -> _Reply:
    """An error in the words of the model behind RapidAPI's gateway."""
    return _json(status, {"error": {"code": code, "message": message}})


def _not_found(path: str) -> _Reply:
    return _message(404, f"Endpoint '{path}' does not exist")


def _with_headers(reply: _Reply, headers: tuple[tuple[str, str], ...]) -> _Reply:
    """`reply` with `headers` added, except names it already carries (a fault's own win)."""
    present = {name.lower() for name, _ in reply.headers}
    extra = tuple(header for header in headers if header[0].lower() not in present)
    return dataclasses.replace(reply, headers=reply.headers + extra) if extra else reply


def _gateway_page(status: int) -> _Reply:
    """The HTML error page of the nginx in front of the API."""
    try:
        title = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        title = f"{status} Error"
    html = (
        f"<html><head><title>{title}</title></head>"
        f"<body><center><h1>{title}</h1></center></body></html>"
    )
    return _Reply(status, html.encode(), "text/html")


def _s3_error(status: int, path: str) -> _Reply:
    """The XML error of the bucket behind an image link: 404 for a missing key, else 403."""
    code, text = (
        ("NoSuchKey", "The specified key does not exist.")
        if status == 404
        else ("AccessDenied", "Request has expired")
    )
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{text}</Message>"
        f"<Key>{path.lstrip('/')}</Key><RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>"
    )
    return _Reply(status, xml.encode(), "application/xml")


class _ImageStore:
    """What answers link to, served at `/images/...` as a CDN or bucket serves it: images,
    and the redirects and error pages of faults.

    A blob stored `once` is dropped after its first complete, undelayed download (the
    emulator's `keep_images=False`); a first download can be delayed (`slow_download`).
    `origin` is the server's `http://host:port`, set once it listens; a reset keeps it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.origin = ""
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._blobs: dict[str, _Reply] = {}
            self._once: set[str] = set()
            self._delays: dict[str, float] = {}
            self._downloads = 0

    @staticmethod
    def new_path(extension: str) -> str:
        return f"/images/{secrets.token_urlsafe(16)}.{extension}"

    def url(self, path: str) -> str:
        return self.origin + path

    def put(self, path: str, blob: _Reply, *, once: bool = False) -> None:
        with self._lock:
            self._blobs[path] = blob
            if once:
                self._once.add(path)

    def delay_first(self, path: str, seconds: float) -> None:
        """Make the first download of `path` wait `seconds` before its answer."""
        with self._lock:
            self._delays[path] = seconds

    def get(self, path: str) -> tuple[_Reply, bool]:
        """The answer to a GET of `path`, and whether to forget the image once it is sent.

        A delayed (slow_download) attempt never drops the image: the client that gave up on
        it must still be able to download it again, as when images are kept.
        """
        with self._lock:
            self._downloads += 1
            blob = self._blobs.get(path)
            delay = self._delays.pop(path, 0.0)
            last = blob is not None and delay == 0 and path in self._once
        time.sleep(delay)
        return blob or _s3_error(404, path), last

    def forget(self, path: str) -> None:
        """Drop an image its client has downloaded in full (keep_images=False)."""
        with self._lock:
            self._blobs.pop(path, None)
            self._once.discard(path)

    @property
    def downloads(self) -> int:
        """GET requests under /images/, found or not."""
        with self._lock:
            return self._downloads


@dataclass(frozen=True)
class _Routes:
    """What the server does with the requests it does not answer itself; the emulator
    supplies each."""

    post: Callable[[str, bytes, dict[str, str]], _Reply]
    """A POST: its path, body and headers (names in lower case)."""
    api: Callable[[str, str, Mapping[str, str], bytes, str], _Reply]
    """A GET outside `/images/`, or a DELETE: method, path, headers, body and query."""
    stats: Callable[[], dict[str, int]]
    reset: Callable[[], None]


class _Handler(BaseHTTPRequestHandler):
    """Moves bytes between the socket and the emulator; all decisions live in the emulator."""

    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes: with Nagle's algorithm on, the second waits for
    # the client's delayed ACK, and every answer comes 40 ms late.
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return "RapidAPI-1.2.8"

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        self.server.track(self.connection, add=False)
        super().finish()

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # the client hung up, e.g. after timing out on a stall
            self.close_connection = True

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            while length > 0:  # read and drop it, so the client gets to read the answer
                chunk = self.rfile.read(min(length, 1024**2))
                if not chunk:
                    break
                length -= len(chunk)
            self._send(_gateway_page(413))
            return
        raw = self.rfile.read(length)
        path = urlsplit(self.path).path
        routes = self.server.routes
        if path == _RESET_PATH:
            routes.reset()
            self._send(_json(200, {}))
        else:
            self._send(routes.post(path, raw, self._headers()))

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        if path == _STATS_PATH:
            self._send(_json(200, self.server.routes.stats()))
        elif path.startswith("/images/"):
            store = self.server.store
            reply, last = store.get(path)
            self._send(reply)  # raises OSError if the client hung up: the image is kept
            if last:
                store.forget(path)
        else:
            self._send(self.server.routes.api("GET", path, self._headers(), b"", url.query))

    def do_DELETE(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        self._send(self.server.routes.api("DELETE", path, self._headers(), b"", ""))

    def _headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}

    def _send(self, reply: _Reply) -> None:
        if reply is _DROPPED:  # the connection ends without an answer, as a proxy's may
            self.close_connection = True
            return
        stream = reply.stream
        try:
            length = len(reply.body) if stream is None else os.fstat(stream.fileno()).st_size
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(length))
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            if stream is None:
                self.wfile.write(reply.body)
            else:
                shutil.copyfileobj(stream, self.wfile, _STREAM_CHUNK)
        finally:
            if stream is not None:
                stream.close()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: a test run makes thousands of requests."""


class _Server(ThreadingHTTPServer):
    """A server that can drop its open connections, so that `stop()` never waits on an idle
    keep-alive client."""

    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not block stop()
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], routes: _Routes, store: _ImageStore) -> None:
        self.routes = routes
        self.store = store
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def drop_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)
