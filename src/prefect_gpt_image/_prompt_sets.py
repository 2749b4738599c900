"""Loading a prompt set: a list, a `.txt`, `.csv` or `.jsonl` file (local or on S3),
or a template times its variables.

Every request is validated here, before anything is paid for; a bad line is
reported with its file and line number. A row whose images are outside the file's
folder and the user's roots is refused alone (see `_input_roots`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from prefect_gpt_image._input_roots import InputRoots, locate
from prefect_gpt_image.errors import InvalidRequestError
from prefect_gpt_image.models import MAX_PROMPT_CHARS, ImageRequest

PROMPT_FILE_SUFFIXES = (".txt", ".csv", ".jsonl")
MAX_TEMPLATE_PROMPTS = 10_000
"""A template's product past this is more likely a mistake than a campaign."""
EXTRAS_COLUMN_PREFIX = "extras."
"""A CSV column named `extras.quality` becomes `extras["quality"]`."""
MAX_JSON_DEPTH = 32
"""A JSON Lines request is a flat object of fields: nesting past this is a broken line, and
would overflow the JSON encoders and hashers that see the request later."""

PromptItem = str | ImageRequest | Mapping[str, Any]
ReadURI = Callable[[str], bytes]


@dataclass(frozen=True)
class PromptSet:
    """A prompt set's requests, and those refused before anything is read for them (a
    prompt file's row naming an image outside its roots), by position."""

    requests: list[ImageRequest]
    refused: dict[int, InvalidRequestError] = field(default_factory=dict)

    @property
    def admitted(self) -> list[ImageRequest]:
        return [r for index, r in enumerate(self.requests) if index not in self.refused]


def load_prompts(
    source: Sequence[PromptItem] | str | Path,
    *,
    width: int = 1024,
    height: int = 1024,
    defaults: Mapping[str, Any] | None = None,
    read_uri: ReadURI | None = None,
    input_roots: Sequence[str | Path] = (),
) -> list[ImageRequest]:
    """The requests in a prompt set, with `width`, `height` and the `ImageRequest` fields in
    `defaults` (those not None) for items that do not give them.

    `source` is a list of prompts, requests or dicts, or the path or `s3://` URI of
    a prompt file; `read_uri` reads `s3://` URIs. The images a prompt file names must be in
    its own folder (for an `s3://` file, its bucket and prefix) or under one of
    `input_roots` (local folders or `s3://bucket/prefix/`); a row naming any other is
    refused, as a malformed row is.
    """
    prompt_set = read_prompt_set(
        source,
        width=width,
        height=height,
        defaults=defaults,
        read_uri=read_uri,
        input_roots=input_roots,
    )
    if prompt_set.refused:
        raise next(iter(prompt_set.refused.values()))
    return prompt_set.requests


def read_prompt_set(
    source: Sequence[PromptItem] | str | Path,
    *,
    width: int = 1024,
    height: int = 1024,
    defaults: Mapping[str, Any] | None = None,
    read_uri: ReadURI | None = None,
    input_roots: Sequence[str | Path] = (),
) -> PromptSet:
    """`load_prompts`, with the rows refused for their images kept apart, so that they fail
    alone and the rest go on."""
    defaults = _defaults(width, height, defaults)
    roots = InputRoots.of(input_roots)
    if isinstance(source, str | Path):
        return _load_file(str(source), defaults, read_uri, roots)
    if not source:
        raise InvalidRequestError("The prompt set is empty.")
    return PromptSet(
        [_request(item, defaults, where=f"prompt #{n}") for n, item in enumerate(source, 1)]
    )


def expand_template(
    template: str,
    variables: Mapping[str, Sequence[str]],
    *,
    width: int = 1024,
    height: int = 1024,
    defaults: Mapping[str, Any] | None = None,
) -> list[ImageRequest]:
    """One request per combination of the variables' values, named after its values.

    `expand_template("{product} on a {background} background", {"product": ["mug", "vase"],
    "background": ["marble", "oak"]})` gives four requests, named "mug marble", "mug oak"...
    """
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise InvalidRequestError(f"The template is not valid: {exc}.") from None
    if not fields:
        raise InvalidRequestError("The template has no {variable} in it.")
    if bad := [f for f in fields if not f.isidentifier()]:
        raise InvalidRequestError(f"Template fields must be plain names, not {bad[0]!r}.")
    used = list(dict.fromkeys(fields))
    if missing := [name for name in used if name not in variables]:
        raise InvalidRequestError(f"The template uses {{{missing[0]}}}, which has no values.")
    if unused := [name for name in variables if name not in used]:
        raise InvalidRequestError(f"The variable {unused[0]!r} is not used in the template.")
    if empty := [name for name in used if not variables[name]]:
        raise InvalidRequestError(f"The variable {empty[0]!r} has no values.")
    count = 1
    for name in used:
        count *= len(variables[name])
    if count > MAX_TEMPLATE_PROMPTS:
        raise InvalidRequestError(
            f"The template expands to {count:,} prompts; at most {MAX_TEMPLATE_PROMPTS:,} "
            "are allowed in one run."
        )
    fields_by_default = _defaults(width, height, defaults)
    requests = []
    for values in itertools.product(*(variables[name] for name in used)):
        combination = dict(zip(used, values, strict=True))
        item = {"prompt": template.format_map(combination), "name": " ".join(values)}
        requests.append(_request(item, fields_by_default, where=f"template with {combination}"))
    return requests


def _defaults(width: int, height: int, defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    given = {name: value for name, value in (defaults or {}).items() if value is not None}
    return {"width": width, "height": height, **given}


def _load_file(
    location: str, defaults: dict[str, Any], read_uri: ReadURI | None, roots: InputRoots
) -> PromptSet:
    suffix = Path(location.split("?", 1)[0]).suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise InvalidRequestError(
            f"{location!r} is not a prompt file: prompts must be a list, or the path or "
            f"s3:// URI of a {', '.join(PROMPT_FILE_SUFFIXES)} file."
        )
    text = _read_text(location, read_uri)
    name = Path(location).name
    if suffix == ".txt":
        rows: list[tuple[int, PromptItem]] = [
            (n, line.strip())
            for n, line in enumerate(_lines(text), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    elif suffix == ".csv":
        rows = _csv_rows(text, name)
    else:
        rows = _jsonl_rows(text, name)
    if not rows:
        raise InvalidRequestError(f"{name} holds no prompts.")
    roots = roots.with_folder_of(location)
    prompt_set = PromptSet([])
    for n, item in rows:
        where = f"{name}, line {n}"
        item, refusal = _confined_inputs(item, location, roots)
        if refusal is not None:
            prompt_set.refused[len(prompt_set.requests)] = _outside(where, refusal)
        prompt_set.requests.append(_request(item, defaults, where=where))
    return prompt_set


def _confined_inputs(
    item: PromptItem, location: str, roots: InputRoots
) -> tuple[PromptItem, str | None]:
    """A row with its images to edit (a CSV `image` column, a JSONL `images` list) and its
    `mask` located (relative to the prompt file's folder) and admitted by `roots`; and why
    the first that no root admits is refused, naming it as the file wrote it."""
    if not isinstance(item, dict):
        return item, None
    item = dict(item)
    if "image" in item:
        item["images"] = [item.pop("image")]
    refusals: list[str] = []

    def admitted(ref: object, what: str) -> object:
        if not isinstance(ref, str):  # an InputImage's fields would name a file unchecked
            refusals.append(
                f"it gives the {what} as a JSON {type(ref).__name__}; a prompt file names "
                "images by path or s3:// URI"
            )
            return ref
        located = locate(ref, location)
        path = roots.admit(located)
        if path is None:
            refusals.append(
                f"the {what} {ref!r} is not below the prompt file's folder or an input root "
                f"({roots.describe()})"
            )
            return located
        return path

    if isinstance(item.get("images"), list):
        item["images"] = [admitted(ref, "input image") for ref in item["images"]]
    if item.get("mask") is not None:
        item["mask"] = admitted(item["mask"], "mask")
    return item, refusals[0] if refusals else None


def _outside(where: str, reason: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{where}: refused, and nothing read for it: {reason}. A prompt file may name only "
        "images below its own folder; to edit images elsewhere, name their folder in "
        "edit.input_roots (--input-root on the command line)."
    )


def _read_text(location: str, read_uri: ReadURI | None) -> str:
    if location.startswith("s3://"):
        if read_uri is None:
            raise InvalidRequestError(f"Cannot read {location}: no S3 bucket to read it with.")
        data = read_uri(location)
    else:
        try:
            data = Path(location).expanduser().read_bytes()
        except OSError as exc:
            raise InvalidRequestError(
                f"Cannot read the prompt file {location}: {exc.strerror or exc}."
            ) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"The prompt file {location} is not UTF-8 text (byte {exc.start})."
        ) from None


def _lines(text: str) -> list[str]:
    """Lines split at line ends only: LF, CRLF, and CR alone (old Mac files, which would
    otherwise be one long prompt). `str.splitlines` also splits at U+2028 and kin, which
    may stand inside a prompt."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _csv_rows(text: str, name: str) -> list[tuple[int, PromptItem]]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        return _csv_records(reader, name)
    except csv.Error as exc:
        line = max(reader.reader.line_num, 1)  # the DictReader's own stops at the last row
        if "field limit" in str(exc):
            raise InvalidRequestError(
                f"{name}, line {line}: a cell holds more than {csv.field_size_limit():,} "
                f"characters (CSV's limit), and a prompt may have at most {MAX_PROMPT_CHARS:,}. "
                "Check the file's quotes: an unclosed one runs on to the end of the file."
            ) from None
        raise InvalidRequestError(f"{name}, line {line}: not valid CSV ({exc}).") from None


def _csv_records(reader: csv.DictReader[str], name: str) -> list[tuple[int, PromptItem]]:
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
        raise InvalidRequestError(f"{name}, line 1: a CSV prompt file needs a 'prompt' column.")
    rows: list[tuple[int, PromptItem]] = []
    for record in reader:
        fields: dict[str, Any] = {}
        extras: dict[str, Any] = {}
        for column, value in record.items():
            if column is None:
                raise InvalidRequestError(
                    f"{name}, line {reader.line_num}: more cells than columns."
                )
            if value in (None, ""):
                continue
            if column.startswith(EXTRAS_COLUMN_PREFIX):
                extras[column.removeprefix(EXTRAS_COLUMN_PREFIX)] = value
            else:
                fields[column] = value
        if extras:
            fields["extras"] = extras
        if any(fields.values()):
            rows.append((reader.line_num, fields))
    return rows


def _jsonl_rows(text: str, name: str) -> list[tuple[int, PromptItem]]:
    rows: list[tuple[int, PromptItem]] = []
    for n, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{name}, line {n}: not valid JSON ({exc.msg}).") from None
        except RecursionError:  # deeper than Python's own parser goes
            raise _too_deep(name, n) from None
        if _depth(item) > MAX_JSON_DEPTH:
            raise _too_deep(name, n)
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{name}, line {n}: expected an object or a string.")
        rows.append((n, item))
    return rows


def _too_deep(name: str, line: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"{name}, line {line}: arrays or objects nested more than {MAX_JSON_DEPTH} deep. A "
        "line is a prompt (a JSON string) or an object of a request's fields; check the "
        "line's brackets."
    )


def _depth(value: object) -> int:
    """How deep arrays and objects nest in a parsed JSON value (a string is 0), counted
    without recursion, whatever the depth."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _request(item: PromptItem, defaults: dict[str, Any], where: str) -> ImageRequest:
    if isinstance(item, ImageRequest):
        return item
    fields = {"prompt": item} if isinstance(item, str) else dict(item)
    try:
        return ImageRequest.model_validate({**defaults, **fields})
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise InvalidRequestError(f"{where}: {problems}") from None


def _describe(error: Mapping[str, Any]) -> str:
    field = ".".join(str(part) for part in error.get("loc", ())) or "request"
    if error.get("type") == "extra_forbidden":
        known = ", ".join(ImageRequest.model_fields)
        return f"unknown field {field!r} (known: {known}, or extras.* columns)"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{field}: {message}"
