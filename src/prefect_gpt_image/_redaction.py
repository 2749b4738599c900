"""Keeping API keys, and passwords in URLs, out of error text and names.

The credentials blocks refuse keys that cannot be sent (see `blocks._route`), so no
product message should ever hold one. This is the second line, and one boundary that every
call to a route's API crosses, synchronous or through the Batch API: `keyless`. An error
that leaves it is scrubbed of the route's key, whoever wrote its text (httpx quotes a header
it refuses, key and all; a gateway may quote the key it rejected in its answer), before
anything records it: the task's state, the report, the manifest, the logs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

MASK = "***"


@contextmanager
def keyless(secret: str) -> Iterator[None]:
    """Every error raised inside leaves scrubbed of `secret` (see `scrub_error`)."""
    try:
        yield
    except BaseException as exc:
        scrub_error(exc, secret)
        raise


def without_userinfo(url: str) -> str:
    """`url` without the `user:password@` before its host, for names, messages and logs:
    a gateway's or Redis's password given in the URL is a secret too."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def scrub(text: str, secret: str) -> str:
    """`text` with every form of `secret` replaced by `***`: as given, stripped of
    surrounding whitespace, and as `repr` escapes them (how a refused header is quoted)."""
    for form in _forms(secret):
        text = text.replace(form, MASK)
    return text


def scrub_error(error: BaseException, secret: str) -> BaseException:
    """Scrub `error` in place and return it: its arguments and notes lose the key, keeping
    its type, its fields and its traceback; a cause or context whose text holds the key is
    cut off, since it cannot be rewritten safely."""
    if not _forms(secret):
        return error
    error.args = tuple(scrub(a, secret) if isinstance(a, str) else a for a in error.args)
    notes = getattr(error, "__notes__", None)
    if isinstance(notes, list):
        error.__notes__ = [scrub(n, secret) if isinstance(n, str) else n for n in notes]
    if _mentions(error.__cause__, secret) or _mentions(error.__context__, secret):
        error.__cause__, error.__context__ = None, None
        error.__suppress_context__ = True
    return error


def _forms(secret: str) -> list[str]:
    """The non-empty forms of a secret, longest first, so that no part of one is left."""
    stripped = secret.strip()
    forms = {secret, stripped, repr(secret)[1:-1], repr(stripped)[1:-1]}
    return sorted((f for f in forms if f), key=len, reverse=True)


def _mentions(error: BaseException | None, secret: str) -> bool:
    """Whether the text of `error`, or of any error behind it, holds a form of `secret`."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = f"{error!s} {error.args!r} {getattr(error, '__notes__', '')}"
        if any(form in text for form in _forms(secret)):
            return True
        error = error.__cause__ or error.__context__
    return False
