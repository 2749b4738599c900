"""Where the images a prompt file names may be read from.

A prompt file is data, often written by someone else (a shared bucket, a form's export), so
it does not decide what the worker reads: an image it names must be in the file's own folder
(for an `s3://` file, its bucket and prefix) or below, or under a root the user named
(the flow's `edit.input_roots`). Anything else is refused for its row, judged by its name alone:
nothing outside the roots is opened, listed or looked up, so a refusal says nothing about
what is there.

Images named in code (`ImageRequest(images=...)`, the flow's `edit.images`) are the user's own
choice, and are not confined.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from prefect_gpt_image._object_keys import s3_uri, split_s3_uri
from prefect_gpt_image.errors import InvalidRequestError

MAX_LINKS = 40
"""Links followed for one path before it is refused, as the OS gives up on a loop."""


@dataclass(frozen=True)
class InputRoots:
    """Local folders and S3 prefixes (`bucket`, `key prefix` ending in `/`, or empty for the
    whole bucket) that a prompt file's images may be under. A folder is kept as named (made
    absolute) and as it really is (links resolved): a path written either way is under it."""

    folders: tuple[tuple[Path, Path], ...] = ()
    prefixes: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, roots: Iterable[str | Path]) -> InputRoots:
        """The roots a user named: local folders (relative to the working directory) and
        `s3://bucket/prefix/` folders."""
        folders: list[tuple[Path, Path]] = []
        prefixes: list[tuple[str, str]] = []
        for root in roots:
            text = str(root)
            if text.startswith("s3://"):
                bucket_name, key = split_s3_uri(text)
                prefixes.append((bucket_name, _as_folder(key)))
            elif "://" in text:
                raise InvalidRequestError(
                    f"The input root {text!r} is neither a local folder nor an s3:// URI."
                )
            else:
                folders.append(_folder(Path(text).expanduser()))
        return cls(tuple(folders), tuple(prefixes))

    def with_folder_of(self, location: str) -> InputRoots:
        """These roots and the folder of the prompt file at `location`."""
        if location.startswith("s3://"):
            bucket_name, key = split_s3_uri(location)
            prefix = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
            return InputRoots(self.folders, ((bucket_name, prefix), *self.prefixes))
        return InputRoots(
            (_folder(Path(location).expanduser().parent), *self.folders), self.prefixes
        )

    def admit(self, ref: str) -> str | None:
        """`ref` (an `s3://` URI or an absolute local path, as `locate` gives) as it is to
        be read, if it is under a root; else None."""
        if ref.startswith("s3://"):
            return ref if self._admits_object(ref) else None
        if not os.path.isabs(ref):
            return None
        real = self._real(Path(os.path.normpath(ref)), links=0)
        return None if real is None else str(real)

    def describe(self) -> str:
        """The roots, for a refusal."""
        shown = dict.fromkeys(
            [str(named) for named, _ in self.folders]
            + [s3_uri(bucket_name, prefix) for bucket_name, prefix in self.prefixes]
        )
        return ", ".join(shown)

    def _real(self, path: Path, links: int) -> Path | None:
        """`path` (absolute, normalized) with its links resolved, if it and every link on
        the way stay under a folder; else None. Only what is under a folder is looked up:
        a link's target is judged by its name before anything there is touched."""
        start = next(
            (
                (real, path.relative_to(form))
                for named, real in self.folders
                for form in (named, real)
                if path.is_relative_to(form)
            ),
            None,
        )
        if start is None:
            return None
        current, rest = start
        for part in rest.parts:
            step = current / part
            if not step.is_symlink():
                current = step
                continue
            if links >= MAX_LINKS:
                return None
            # `current` has no links left in it, so ".." in the target is its real parent.
            target = Path(os.path.normpath(current / os.readlink(step)))
            resolved = self._real(target, links + 1)
            if resolved is None:
                return None
            current = resolved
        return current

    def _admits_object(self, uri: str) -> bool:
        bucket_name, key = split_s3_uri(uri)
        if not key or any(part in (".", "..") for part in key.split("/")):
            return False
        return any(
            bucket_name == root_bucket and key.startswith(prefix)
            for root_bucket, prefix in self.prefixes
        )


def locate(ref: str, location: str) -> str:
    """Where a ref in the prompt file at `location` points, by its name alone: an `s3://`
    URI, an absolute local path, or `ref` as it is for any other scheme (which no root
    admits). A relative ref is relative to the file's folder."""
    if ref.startswith("s3://"):
        return ref
    if ref.startswith("file://"):
        return url2pathname(urlsplit(ref).path)
    if "://" in ref or os.path.isabs(ref):
        return ref
    if location.startswith("s3://"):
        bucket_name, key = split_s3_uri(location)
        prefix = key.rsplit("/", 1)[0] if "/" in key else ""
        return s3_uri(bucket_name, posixpath.normpath(posixpath.join(prefix, ref)))
    folder = Path(location).expanduser().parent.resolve()
    return os.path.normpath(folder / ref)


def _as_folder(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"


def _folder(folder: Path) -> tuple[Path, Path]:
    """A folder as named (made absolute) and as it really is: the user named it, so its
    own links are followed."""
    named = Path(os.path.normpath(folder.absolute()))
    return named, named.resolve()
