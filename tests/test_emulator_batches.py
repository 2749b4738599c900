"""The emulator's Files and Batch APIs, driven by the official `openai` package over real HTTP.

A batch of image requests is validated, run, expired or cancelled as OpenAI runs one; each
line is answered as the synchronous endpoint answers it, recorded apart from synchronous
calls, and the batch, file and line objects match OpenAI's published schema.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import jsonschema
import openai
import pytest
from openai.types import Batch
from PIL import Image

from prefect_gpt_image.testing import Fault, GptImageEmulator

SCHEMA_PATH = Path(__file__).parent / "data" / "openai-batch-schema.json"
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
MODEL = "gpt-image-2"
ENDED = ("completed", "failed", "expired", "cancelled")

Line = dict[str, Any]


@functools.cache
def _validator(component: str) -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text())[component]
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def validate(component: str, instance: Any) -> None:
    """Check `instance` against OpenAI's `component` (Batch, OpenAIFile, BatchRequestOutput)."""
    _validator(component).validate(instance)


@pytest.fixture
def client(
    api: GptImageEmulator, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[openai.OpenAI]:
    """A client of the emulator, whose batches run as fast as their images are drawn."""
    monkeypatch.setattr(api, "batch_processing_seconds", 0.0)
    with openai.OpenAI(base_url=api.openai_base_url, api_key=api_key, max_retries=0) as sdk:
        yield sdk


def generation(custom_id: str, prompt: str, **options: Any) -> Line:
    body = {"model": MODEL, "prompt": prompt, "size": "256x256", **options}
    return {"custom_id": custom_id, "method": "POST", "url": GENERATIONS, "body": body}


def jsonl(lines: list[Line]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def upload(client: openai.OpenAI, lines: list[Line] | bytes) -> str:
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    return client.files.create(file=("requests.jsonl", data), purpose="batch").id


def submit(
    client: openai.OpenAI, lines: list[Line] | bytes, endpoint: str = GENERATIONS, **options: Any
) -> Batch:
    return client.batches.create(
        input_file_id=upload(client, lines),
        endpoint=cast(Any, endpoint),
        completion_window="24h",
        **options,
    )


def wait(
    client: openai.OpenAI,
    batch_id: str,
    ready: Callable[[Batch], bool] = lambda batch: batch.status in ENDED,
    timeout: float = 30.0,
) -> Batch:
    """Poll the batch until `ready` (by default: until it has ended)."""
    deadline = time.monotonic() + timeout
    while not ready(batch := client.batches.retrieve(batch_id)):
        assert time.monotonic() < deadline, f"{batch_id} is still {batch.status}"
        time.sleep(0.02)
    return batch


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[Line]:
    """An output or error file's lines, read as a stream."""
    assert file_id is not None
    with client.files.with_streaming_response.content(file_id) as response:
        return [json.loads(line) for line in response.iter_lines() if line]


def by_custom_id(lines: list[Line]) -> dict[str, Line]:
    return {line["custom_id"]: line for line in lines}


def counts(batch: Batch) -> tuple[int, int, int]:
    assert batch.request_counts is not None
    return batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def sha256(b64: str) -> str:
    return hashlib.sha256(base64.b64decode(b64)).hexdigest()


def encode(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


# -- a batch's life -----------------------------------------------------------------------------


def test_a_batch_of_generations_completes_with_served_images_and_usage(
    client: openai.OpenAI, api: GptImageEmulator
) -> None:
    lines = [
        generation("wide", "a lighthouse at dusk", size="512x256", quality="low"),
        generation("square", "a fox in the snow"),
        generation("pair", "two owls on a branch", n=2, output_format="webp"),
    ]
    created = submit(client, lines, metadata={"run": "nightly"})
    assert (created.status, created.metadata, counts(created)) == (
        "validating",
        {"run": "nightly"},
        (0, 0, 0),
    )
    assert created.id.startswith("batch_") and created.output_file_id is None
    batch = wait(client, created.id)
    assert (batch.status, counts(batch), batch.model) == ("completed", (3, 3, 0), MODEL)
    assert batch.errors is None and batch.error_file_id is None

    output = by_custom_id(lines_of(client, batch.output_file_id))
    assert set(output) == {"wide", "square", "pair"}
    sizes = {"wide": (512, 256), "square": (256, 256), "pair": (256, 256)}
    for custom_id, line in output.items():
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        for item in response["body"]["data"]:
            assert sha256(item["b64_json"]) in api.served  # the bytes the emulator drew
            assert decode(item["b64_json"]).size == sizes[custom_id]
    pair = output["pair"]["response"]["body"]
    assert [decode(item["b64_json"]).format for item in pair["data"]] == ["WEBP", "WEBP"]
    assert pair["usage"]["output_tokens"] == 2 * 66  # 1056 tokens per megapixel, medium
    assert output["wide"]["response"]["body"]["quality"] == "low"

    # Batch requests are recorded apart from synchronous calls, with what they billed.
    assert api.calls == []
    records = {call.custom_id: call for call in api.batch_calls}
    assert set(records) == set(output)
    for custom_id, call in records.items():
        assert (call.batch_id, call.path, call.status, call.model) == (
            batch.id,
            GENERATIONS,
            200,
            MODEL,
        )
        assert call.usage == output[custom_id]["response"]["body"]["usage"]
        assert call.headers == {}
    assert batch.usage is not None
    assert batch.usage.output_tokens == sum(
        call.usage["output_tokens"] for call in records.values()
    )
    assert len(api.served) == 4
    assert api.stats == {
        "calls": 0,
        "billed": 0,
        "rate_limited": 0,
        "peak_concurrency": 0,
        "image_downloads": 0,
        "batch_requests": 3,
        "batches_created": 1,
    }

    # The output file is a file like any other, and a batch that ended cannot be cancelled.
    output_file = client.files.retrieve(cast(str, batch.output_file_id))
    assert (output_file.purpose, output_file.filename) == (
        "batch_output",
        f"{batch.id}_output.jsonl",
    )
    assert output_file.bytes == len(client.files.content(output_file.id).content)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    (described,) = api.batches
    assert described == client.batches.with_raw_response.retrieve(batch.id).http_response.json()


def test_statuses_move_forward_while_counts_grow(
    client: openai.OpenAI, api: GptImageEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "batch_processing_seconds", 2.0)
    started = time.monotonic()
    batch = submit(client, [generation(f"r{i}", f"step {i}") for i in range(4)])
    seen = [(batch.status, counts(batch)[1])]
    while seen[-1][0] not in ENDED:
        assert time.monotonic() - started < 30
        batch = client.batches.retrieve(batch.id)
        seen.append((batch.status, counts(batch)[1]))
        time.sleep(0.01)
    assert time.monotonic() - started >= 1.5  # about batch_processing_seconds in all

    order = ["validating", "in_progress", "finalizing", "completed"]
    statuses = list(dict.fromkeys(status for status, _ in seen))
    assert statuses == sorted(statuses, key=order.index)  # never backwards
    assert statuses[0] == "validating" and statuses[-1] == "completed"
    assert any(status == "in_progress" and 0 < done < 4 for status, done in seen)
    completed = [done for _, done in seen]
    assert completed == sorted(completed) and completed[-1] == 4
    assert batch.in_progress_at is not None and batch.finalizing_at is not None
    assert batch.completed_at is not None
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.expires_at == batch.created_at + 24 * 3600


def test_requests_the_api_refuses_go_to_the_error_file_as_it_answers_them(
    client: openai.OpenAI, api: GptImageEmulator
) -> None:
    api.add_fault(Fault.moderation_blocked(), prompt_contains="faulted")
    lines = [
        generation("fine", "a calm lake"),
        generation("rejected", "a [reject] prompt"),
        generation("faulted", "a faulted prompt"),
        generation("bad-size", "odd", size="1000x1000"),
        generation("no-model", "lost", model="gpt-image-9"),
        generation("unknown", "extra", style="vivid"),
    ]
    batch = wait(client, submit(client, lines).id)
    assert (batch.status, counts(batch)) == ("completed", (6, 1, 5))
    assert list(by_custom_id(lines_of(client, batch.output_file_id))) == ["fine"]

    errors = by_custom_id(lines_of(client, batch.error_file_id))
    assert {
        custom_id: (line["response"]["status_code"], line["response"]["body"]["error"]["code"])
        for custom_id, line in errors.items()
    } == {
        "rejected": (400, "moderation_blocked"),
        "faulted": (400, "moderation_blocked"),
        "bad-size": (400, "invalid_value"),
        "no-model": (404, "model_not_found"),
        "unknown": (400, "unknown_parameter"),
    }
    assert all(line["error"] is None for line in errors.values())
    records = {call.custom_id: call for call in api.batch_calls}
    assert records["faulted"].fault == "moderation_blocked"
    assert [custom_id for custom_id, call in records.items() if call.usage] == ["fine"]
    assert len(api.served) == 1

    # Exactly as the synchronous endpoint answers the same body.
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model=MODEL, prompt="odd", size="1000x1000")
    assert refused.value.body == errors["bad-size"]["response"]["body"]["error"]


def test_an_expired_batch_keeps_what_it_completed(
    client: openai.OpenAI, api: GptImageEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "batch_expire_after", 2)
    lines = [generation(f"r{i}", f"expiring {i}") for i in range(5)]
    batch = wait(client, submit(client, lines).id)
    assert (batch.status, counts(batch)) == ("expired", (5, 2, 0))
    assert batch.expired_at is not None and batch.completed_at is None

    output = by_custom_id(lines_of(client, batch.output_file_id))
    assert len(output) == 2
    for line in output.values():
        assert line["response"]["status_code"] == 200
        assert sha256(line["response"]["body"]["data"][0]["b64_json"]) in api.served
    expired = by_custom_id(lines_of(client, batch.error_file_id))
    assert set(output) | set(expired) == {f"r{i}" for i in range(5)}
    assert len(expired) == 3
    for line in expired.values():
        assert line["response"] is None
        assert line["error"]["code"] == "batch_expired" and line["error"]["message"]
    assert {call.custom_id for call in api.batch_calls} == set(output)  # billed: the done part
    assert batch.usage is not None and batch.usage.output_tokens == 2 * 66


def test_a_cancelled_batch_stops_and_keeps_what_completed(
    client: openai.OpenAI, api: GptImageEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "batch_processing_seconds", 4.0)  # 0.4 s per request
    lines = [generation(f"r{i}", f"cancelled {i}") for i in range(8)]
    batch = submit(client, lines)
    wait(client, batch.id, lambda batch: counts(batch)[1] >= 1)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    batch = wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    total, done, failed = counts(batch)
    assert (total, failed) == (8, 0) and 1 <= done < 8

    output = by_custom_id(lines_of(client, batch.output_file_id))
    assert len(output) == done
    cancelled = lines_of(client, batch.error_file_id)
    assert len(cancelled) == 8 - done
    assert {line["error"]["code"] for line in cancelled} == {"batch_cancelled"}
    assert len(api.batch_calls) == done
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling again is no error


def test_output_faults_write_answer_lines_wrong_and_the_requests_are_billed_all_the_same(
    client: openai.OpenAI, api: GptImageEmulator
) -> None:
    api.add_batch_output_fault("not_json", prompt_contains="html")
    api.add_batch_output_fault("truncated", prompt_contains="cut")
    api.add_batch_output_fault("no_custom_id", prompt_contains="anonymous")
    api.add_batch_output_fault("stray", prompt_contains="copied", custom_id="someone-else")
    api.add_batch_output_fault("truncated", prompt_contains="[reject]")
    lines = [
        generation("html", "an html page"),
        generation("cut", "a cut line"),
        generation("anonymous", "an anonymous line"),
        generation("copied", "a copied line"),
        generation("fine", "a fine line"),
        generation("refused", "a [reject] line"),
    ]
    batch = wait(client, submit(client, lines).id)
    assert (batch.status, counts(batch)) == ("completed", (6, 5, 1))

    def raw(file_id: str | None) -> list[str]:
        assert file_id is not None
        with client.files.with_streaming_response.content(file_id) as response:
            return [line for line in response.iter_lines() if line]

    output, errors = raw(batch.output_file_id), raw(batch.error_file_id)
    assert len(output) == 6 and len(errors) == 1
    readable: list[Line] = []
    broken: list[str] = []
    for line in [*output, *errors]:
        try:
            readable.append(json.loads(line))
        except ValueError:
            broken.append(line)
    assert any(line.startswith("<html>") for line in broken)
    cut = sorted(line for line in broken if line.startswith("{"))
    assert len(cut) == 2 and all(not line.endswith("}") for line in cut)
    assert {'"custom_id": "cut"' in line or '"custom_id": "refused"' in line for line in cut} == {
        True
    }
    assert sorted(str(line.get("custom_id")) for line in readable) == [
        "None",
        "copied",
        "fine",
        "someone-else",
    ]
    answers = {line.get("custom_id"): line for line in readable}
    stray, copied = answers["someone-else"], answers["copied"]
    assert stray["response"] == copied["response"] and stray["id"] != copied["id"]
    assert len(api.batch_calls) == 6  # every request was answered, and billed if an image

    with pytest.raises(ValueError, match="custom_id"):
        api.add_batch_output_fault("stray")
    with pytest.raises(ValueError, match="unknown output fault"):
        api.add_batch_output_fault("garbled")


# -- what the API refuses -----------------------------------------------------------------------


def test_an_input_file_that_breaks_the_rules_fails_the_batch(
    client: openai.OpenAI, api: GptImageEmulator
) -> None:
    data = (
        jsonl(
            [
                generation("a", "fine"),
                generation("a", "the same custom_id"),
                {**generation("b", "another endpoint"), "url": EDITS},
            ]
        )
        + b"{not json\n"
        + jsonl(
            [
                {**generation("c", "not a POST"), "method": "GET"},
                {"custom_id": "d", "method": "POST", "url": GENERATIONS},
            ]
        )
    )
    batch = wait(client, submit(client, data).id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.in_progress_at is None and counts(batch) == (0, 0, 0)
    assert batch.errors is not None and batch.errors.data is not None
    assert [(error.line, error.code, error.param) for error in batch.errors.data] == [
        (2, "duplicate_custom_id", "custom_id"),
        (3, "invalid_url", "url"),
        (4, "invalid_json_line", None),
        (5, "invalid_value", "method"),
        (6, "missing_required_parameter", "body"),
    ]
    assert batch.output_file_id is None and batch.error_file_id is None
    assert api.batch_calls == [] and api.served == {}


def test_a_batch_holds_at_most_batch_max_requests(
    client: openai.OpenAI, api: GptImageEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "batch_max_requests", 3)
    too_many = wait(client, submit(client, [generation(f"r{i}", "p") for i in range(4)]).id)
    assert too_many.status == "failed" and too_many.errors and too_many.errors.data
    (error,) = too_many.errors.data
    assert (error.code, error.line) == ("too_many_requests", None)
    assert error.message is not None and "3 requests" in error.message
    enough = wait(client, submit(client, [generation(f"r{i}", "p") for i in range(3)]).id)
    assert (enough.status, counts(enough)) == ("completed", (3, 3, 0))
    empty = wait(client, submit(client, b"").id)
    assert empty.status == "failed" and empty.errors and empty.errors.data
    assert [error.code for error in empty.errors.data] == ["empty_file"]


def test_uploads_are_checked_kept_and_deleted_as_the_api_does(
    client: openai.OpenAI, api: GptImageEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "batch_max_file_bytes", 100)
    with pytest.raises(openai.BadRequestError) as too_big:
        client.files.create(file=("big.jsonl", b"x" * 101), purpose="batch")
    assert (too_big.value.code, too_big.value.param) == ("file_too_large", "file")
    with pytest.raises(openai.BadRequestError) as wrong_purpose:
        client.files.create(file=("a.jsonl", b"{}"), purpose=cast(Any, "batches"))
    assert (wrong_purpose.value.code, wrong_purpose.value.param) == ("invalid_value", "purpose")
    with pytest.raises(openai.BadRequestError) as not_jsonl:
        client.files.create(file=("requests.txt", b"{}"), purpose="batch")
    assert not_jsonl.value.param == "file"

    monkeypatch.setattr(api, "batch_max_file_bytes", 10_000)
    data = jsonl([generation("a", "p")])
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert uploaded.id.startswith("file-")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose, uploaded.status) == (
        len(data),
        "requests.jsonl",
        "batch",
        "processed",
    )
    assert uploaded.expires_at == uploaded.created_at + 30 * 24 * 3600
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == data
    assert [file.id for file in client.files.list(purpose="batch")] == [uploaded.id]

    photo = client.files.create(file=("photo.png", encode((1, 2, 3), (16, 16))), purpose="vision")
    with pytest.raises(openai.BadRequestError) as not_for_batches:
        client.batches.create(input_file_id=photo.id, endpoint=GENERATIONS, completion_window="24h")
    assert not_for_batches.value.param == "input_file_id"
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-missing", endpoint=GENERATIONS, completion_window="24h"
        )

    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(uploaded.id)


def test_batches_are_created_for_the_endpoints_and_window_the_api_allows(
    client: openai.OpenAI, api: GptImageEmulator
) -> None:
    file_id = upload(client, [generation("a", "p")])
    for change, param in [
        ({"endpoint": "/v1/images/variations"}, "endpoint"),
        ({"completion_window": "48h"}, "completion_window"),
    ]:
        request = {
            "input_file_id": file_id,
            "endpoint": GENERATIONS,
            "completion_window": "24h",
            **change,
        }
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.create(**cast(Any, request))
        assert (refused.value.code, refused.value.param) == ("invalid_value", param)

    # The schema allows other endpoints; their requests meet a URL the emulator does not serve.
    chat = {
        "custom_id": "chat",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": []},
    }
    batch = wait(client, submit(client, [chat], endpoint="/v1/chat/completions").id)
    assert (batch.status, counts(batch)) == ("completed", (1, 0, 1))
    (line,) = lines_of(client, batch.error_file_id)
    assert line["response"]["status_code"] == 404
    assert api.served == {}


def test_a_wrong_key_is_refused_on_every_files_and_batches_endpoint(
    client: openai.OpenAI, api: GptImageEmulator
) -> None:
    batch = submit(client, [generation("a", "p")])
    file_id = batch.input_file_id
    with openai.OpenAI(
        base_url=api.openai_base_url, api_key="sk-wrong-0123456789", max_retries=0
    ) as wrong:
        attempts: list[Callable[[], object]] = [
            lambda: wrong.files.create(file=("a.jsonl", b"{}"), purpose="batch"),
            lambda: wrong.files.retrieve(file_id),
            lambda: wrong.files.content(file_id),
            lambda: wrong.files.delete(file_id),
            lambda: wrong.batches.create(
                input_file_id=file_id, endpoint=GENERATIONS, completion_window="24h"
            ),
            lambda: wrong.batches.retrieve(batch.id),
            lambda: wrong.batches.cancel(batch.id),
            lambda: wrong.batches.list(),
        ]
        for attempt in attempts:
            with pytest.raises(openai.AuthenticationError) as refused:
                attempt()
            assert refused.value.code == "invalid_api_key"
    assert client.files.retrieve(file_id).id == file_id
    assert [described["id"] for described in api.batches] == [batch.id]


# -- listing, edits, large files ----------------------------------------------------------------


def test_batches_are_listed_newest_first_in_pages(
    client: openai.OpenAI, api: GptImageEmulator
) -> None:
    ids = [submit(client, [generation("a", f"listed {i}")]).id for i in range(3)]
    newest_first = ids[::-1]
    first = client.batches.list(limit=2)
    assert [batch.id for batch in first.data] == newest_first[:2] and first.has_more
    assert [batch.id for batch in client.batches.list(limit=2)] == newest_first  # pages on
    assert [batch.id for batch in client.batches.list(after=ids[1]).data] == [ids[0]]
    with pytest.raises(openai.BadRequestError):
        client.batches.list(limit=101)


def test_edits_in_a_batch_read_data_urls_and_uploaded_files(
    client: openai.OpenAI, api: GptImageEmulator
) -> None:
    photo = encode((200, 30, 30), (96, 64))
    uploaded = client.files.create(file=("photo.png", photo), purpose="vision")
    data_url = "data:image/png;base64," + base64.b64encode(photo).decode()

    def edit(custom_id: str, images: list[dict[str, str]], **options: Any) -> Line:
        body = {"model": MODEL, "prompt": "add a hat", "images": images, **options}
        return {"custom_id": custom_id, "method": "POST", "url": EDITS, "body": body}

    lines = [
        edit("inline", [{"image_url": data_url}]),
        edit("by-id", [{"file_id": uploaded.id}], input_fidelity="high"),
        edit("remote", [{"image_url": "https://example.com/photo.png"}]),
    ]
    batch = wait(client, submit(client, lines, endpoint=EDITS).id)
    assert (batch.status, counts(batch)) == ("completed", (3, 2, 1))
    output = by_custom_id(lines_of(client, batch.output_file_id))
    for custom_id in ("inline", "by-id"):
        image = output[custom_id]["response"]["body"]["data"][0]["b64_json"]
        assert decode(image).size == (96, 64)  # "auto" follows the first image, as a sync edit
        assert sha256(image) in api.served
    (remote,) = lines_of(client, batch.error_file_id)
    assert remote["response"]["status_code"] == 400
    assert remote["response"]["body"]["error"]["param"] == "images[0]"

    records = {call.custom_id: call for call in api.batch_calls}
    digest = hashlib.sha256(photo).hexdigest()
    assert records["inline"].inputs == records["by-id"].inputs == [digest]
    assert (records["inline"].input_fidelity, records["by-id"].input_fidelity) == ("low", "high")
    usage = {custom_id: records[custom_id].usage or {} for custom_id in ("inline", "by-id")}
    assert usage["by-id"]["input_tokens"] > usage["inline"]["input_tokens"]
    assert records["inline"].path == EDITS and "images" not in records["inline"].body


def test_a_large_output_file_is_streamed_from_disk(
    client: openai.OpenAI, api: GptImageEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "image_bytes", 700_000)  # three images: past a 1 MB chunk
    batch = wait(client, submit(client, [generation(f"r{i}", f"big {i}") for i in range(3)]).id)
    output_file = client.files.retrieve(cast(str, batch.output_file_id))
    assert output_file.bytes > 3 * 700_000
    with client.files.with_streaming_response.content(output_file.id) as response:
        assert response.headers["content-length"] == str(output_file.bytes)
        lines = [json.loads(line) for line in response.iter_lines() if line]
    images = [line["response"]["body"]["data"][0]["b64_json"] for line in lines]
    assert len(images) == 3
    assert all(len(base64.b64decode(image)) >= 700_000 for image in images)
    assert all(sha256(image) in api.served for image in images)


# -- reset and stop -----------------------------------------------------------------------------


def test_reset_stops_batches_and_forgets_files(
    client: openai.OpenAI, api: GptImageEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "batch_processing_seconds", 60.0)
    batch = submit(client, [generation(f"r{i}", "slow") for i in range(3)])
    started = time.monotonic()
    api.reset()
    assert time.monotonic() - started < 5
    assert api.batches == [] and api.batch_calls == [] and api.stats["batches_created"] == 0
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(batch.input_file_id)


def test_files_live_on_disk_until_the_emulator_stops(
    api_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with (
        GptImageEmulator(api_key=api_key, batch_processing_seconds=0) as emulator,
        openai.OpenAI(base_url=emulator.openai_base_url, api_key=api_key, max_retries=0) as sdk,
    ):
        data = jsonl([generation("a", "on disk")])
        sdk.files.create(file=("requests.jsonl", data), purpose="batch")
        (directory,) = tmp_path.iterdir()
        assert [path.read_bytes() for path in directory.iterdir()] == [data]
    assert list(tmp_path.iterdir()) == []


# -- OpenAI's published schema ------------------------------------------------------------------


def test_batch_file_and_line_objects_match_the_published_schema(
    client: openai.OpenAI, api: GptImageEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def raw(batch_id: str) -> dict[str, Any]:
        response = client.batches.with_raw_response.retrieve(batch_id)
        return cast(dict[str, Any], response.http_response.json())

    lines = [generation("ok", "fine"), generation("refused", "a [reject] prompt")]
    created = client.batches.with_raw_response.create(
        input_file_id=upload(client, lines),
        endpoint=GENERATIONS,
        completion_window="24h",
        metadata={"purpose": "schema"},
    ).http_response.json()
    validate("Batch", created)
    completed = raw(wait(client, created["id"]).id)
    assert completed["status"] == "completed"
    validate("Batch", completed)

    def described(file_id: str) -> Any:
        return client.files.with_raw_response.retrieve(file_id).http_response.json()

    validate("OpenAIFile", described(completed["input_file_id"]))
    for file_id in (completed["output_file_id"], completed["error_file_id"]):
        validate(
            "OpenAIFile", client.files.with_raw_response.retrieve(file_id).http_response.json()
        )
        for line in lines_of(client, file_id):
            validate("BatchRequestOutput", line)

    failed = submit(client, [generation("same", "p"), generation("same", "p")])
    validate("Batch", raw(wait(client, failed.id).id))
    monkeypatch.setattr(api, "batch_expire_after", 0)
    expired = raw(wait(client, submit(client, [generation("late", "p")]).id).id)
    assert expired["status"] == "expired"
    validate("Batch", expired)
    for line in lines_of(client, expired["error_file_id"]):
        validate("BatchRequestOutput", line)
    monkeypatch.setattr(api, "batch_processing_seconds", 2.0)
    slow = submit(client, [generation("slow", "p")])
    cancelling = client.batches.with_raw_response.cancel(slow.id).http_response.json()
    assert cancelling["status"] == "cancelling"
    validate("Batch", cancelling)
    validate("Batch", raw(wait(client, slow.id).id))
    for described in api.batches:
        validate("Batch", described)
