"""The emulator's rate limit, padded images, bounded memory and HTTP controls, over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import io
import selectors
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from prefect_gpt_image._images import inspect_image
from prefect_gpt_image.testing import Fault, GptImageEmulator

KEY = "emulator-test-key"
HOST = "gpt-image-1-5.p.rapidapi.com"
HEADERS = {"x-rapidapi-key": KEY, "x-rapidapi-host": HOST}
LIMIT_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5, limits=httpx.Limits(max_connections=32)) as http:
        yield http


def generate(
    client: httpx.Client, emulator: GptImageEmulator, prompt: str = "a red fox"
) -> httpx.Response:
    return client.post(emulator.url, json={"prompt": prompt}, headers=HEADERS)


def download(client: httpx.Client, response: httpx.Response) -> httpx.Response:
    return client.get(response.json()["url"])


def png_chunks(data: bytes) -> list[tuple[bytes, int, bool]]:
    """(type, length, CRC correct) of each chunk of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        chunks.append((kind, length, zlib.crc32(kind + body) == crc))
        at += 12 + length
    return chunks


# -- rate limit ---------------------------------------------------------------------------------


def test_burst_admits_one_second_of_requests_and_refuses_the_rest(client: httpx.Client) -> None:
    with GptImageEmulator(api_key=KEY, rate_limit=5) as emulator:
        started = time.monotonic()
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: generate(client, emulator), range(12)))
        elapsed = time.monotonic() - started
        statuses = [response.status_code for response in responses]
        admitted = statuses.count(200)
        assert statuses.count(429) == 12 - admitted
        assert 5 <= admitted <= 5 + int(elapsed * 5) + 1  # the bucket refills during the burst
        assert emulator.rate_limited == 12 - admitted
        assert emulator.billed == admitted
        assert len(emulator.calls) == 12
        for response in responses:
            assert all(name in response.headers for name in LIMIT_HEADERS)
            assert response.headers["x-ratelimit-limit"] == "5"
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json() == {"message": "Too many requests"}
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.headers["x-ratelimit-remaining"] == "0"
        assert int(refused.headers["x-ratelimit-reset"]) >= 1
        assert "x-ratelimit-requests-limit" not in refused.headers  # not the monthly quota


def test_first_answer_reports_the_bucket(client: httpx.Client) -> None:
    with GptImageEmulator(api_key=KEY, rate_limit=5) as emulator:
        response = generate(client, emulator)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit"] == "5"
        assert response.headers["x-ratelimit-remaining"] == "4"
        assert response.headers["x-ratelimit-reset"] == "1"  # one token back in 0.2 s
        assert "Retry-After" not in response.headers


def test_retry_after_is_honest(client: httpx.Client) -> None:
    with GptImageEmulator(api_key=KEY, rate_limit=2) as emulator:
        assert [generate(client, emulator).status_code for _ in range(2)] == [200, 200]
        refused = generate(client, emulator)
        assert refused.status_code == 429
        retry_after = int(refused.headers["Retry-After"])
        assert retry_after == 1
        time.sleep(retry_after)
        assert generate(client, emulator).status_code == 200
        assert emulator.rate_limited == 1


def test_a_client_pacing_at_the_limit_is_never_refused(client: httpx.Client) -> None:
    with GptImageEmulator(api_key=KEY, rate_limit=5) as emulator:
        started = time.monotonic()
        for index in range(10):
            time.sleep(max(0.0, started + index / 5 - time.monotonic()))
            assert generate(client, emulator).status_code == 200
        assert emulator.rate_limited == 0
        assert emulator.billed == 10


def test_a_slow_limit_makes_clients_wait_several_seconds(client: httpx.Client) -> None:
    with GptImageEmulator(api_key=KEY, rate_limit=0.25) as emulator:
        first = generate(client, emulator)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit"] == "1"
        assert first.headers["x-ratelimit-reset"] == "4"
        refused = generate(client, emulator)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] in ("3", "4")  # ceil of just under 4 s


def test_reset_refills_the_bucket_and_keeps_the_limit(client: httpx.Client) -> None:
    with GptImageEmulator(api_key=KEY, rate_limit=1) as emulator:
        assert [generate(client, emulator).status_code for _ in range(2)] == [200, 429]
        assert emulator.rate_limited == 1
        emulator.reset()
        assert emulator.rate_limit == 1
        assert emulator.rate_limited == 0
        assert generate(client, emulator).status_code == 200


def test_unauthenticated_calls_spend_no_token_and_get_no_limit_headers(
    client: httpx.Client,
) -> None:
    with GptImageEmulator(api_key=KEY, rate_limit=1) as emulator:
        for _ in range(3):
            refused = client.post(
                emulator.url, json={"prompt": "x"}, headers={**HEADERS, "x-rapidapi-key": "bad"}
            )
            assert refused.status_code == 401
            assert not any(name in refused.headers for name in LIMIT_HEADERS)
        assert generate(client, emulator).status_code == 200
        assert emulator.rate_limited == 0


def test_limit_can_be_set_later_and_headers_turned_off(client: httpx.Client) -> None:
    with GptImageEmulator(api_key=KEY, rate_limit_headers=False) as emulator:
        assert all(generate(client, emulator).status_code == 200 for _ in range(3))
        emulator.rate_limit = 1
        assert generate(client, emulator).status_code == 200
        refused = generate(client, emulator)
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert not any(name in refused.headers for name in LIMIT_HEADERS)
        emulator.rate_limit = None
        assert generate(client, emulator).status_code == 200
    with pytest.raises(ValueError):
        GptImageEmulator(rate_limit=0)


def test_injected_rate_limit_fault_is_counted_apart(client: httpx.Client) -> None:
    with GptImageEmulator(api_key=KEY, rate_limit=10) as emulator:
        emulator.add_fault(Fault.rate_limited())
        faulted = generate(client, emulator)
        assert faulted.status_code == 429
        assert faulted.headers["x-ratelimit-requests-remaining"] == "0"  # the monthly quota
        assert faulted.headers["x-ratelimit-remaining"] == "9"  # the per-second bucket
        assert emulator.rate_limited == 0
        assert [call.fault for call in emulator.calls] == ["rate_limited"]


# -- padded images ------------------------------------------------------------------------------


def test_images_are_padded_and_still_valid(client: httpx.Client) -> None:
    size = 300_000
    with GptImageEmulator(api_key=KEY, image_bytes=size) as emulator:
        first = download(client, generate(client, emulator)).content
        second = download(client, generate(client, emulator)).content
        for data in (first, second):
            assert len(data) >= size
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
            assert (inspect_image(data).width, inspect_image(data).height) == (1024, 1024)
            chunks = png_chunks(data)
            assert all(crc_ok for _, _, crc_ok in chunks)
            (padding, padding_length, _), end = chunks[-2], chunks[-1]
            assert (padding, end[0]) == (b"prVt", b"IEND")
            assert len(zlib.compress(data, 1)) > padding_length  # random filler: incompressible
            assert hashlib.sha256(data).hexdigest() in emulator.served
        assert first != second


def test_padding_is_cheap_and_works_inline() -> None:
    with GptImageEmulator(api_key=KEY, image_bytes=1_000_000, shape="data_b64") as emulator:
        started = time.monotonic()
        response = httpx.post(
            emulator.url, json={"prompt": "p", "width": 64, "height": 64}, headers=HEADERS
        )
        assert time.monotonic() - started < 1.0
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    assert len(data) >= 1_000_000
    assert inspect_image(data).width == 64


def test_image_bytes_needs_png() -> None:
    with pytest.raises(ValueError, match="PNG"):
        GptImageEmulator(image_format="jpeg", image_bytes=1000)
    with pytest.raises(ValueError):
        GptImageEmulator(image_bytes=0)


# -- bounded memory -----------------------------------------------------------------------------


def test_without_keep_images_only_hashes_stay_and_images_go_once_downloaded(
    client: httpx.Client,
) -> None:
    with GptImageEmulator(api_key=KEY, keep_images=False, image_bytes=50_000) as emulator:
        response = generate(client, emulator)
        first = download(client, response)
        assert first.status_code == 200
        assert len(first.content) >= 50_000
        assert emulator.served == {hashlib.sha256(first.content).hexdigest(): b""}
        again = download(client, response)
        assert again.status_code == 404
        assert emulator.image_downloads == 2


def test_without_keep_images_a_slow_download_can_still_be_retried(client: httpx.Client) -> None:
    with GptImageEmulator(api_key=KEY, keep_images=False) as emulator:
        emulator.add_fault(Fault.slow_download(0.6))
        response = generate(client, emulator)
        url = response.json()["url"]
        with pytest.raises(httpx.ReadTimeout):
            client.get(url, timeout=0.1)
        retried = client.get(url)
        assert retried.status_code == 200
        assert hashlib.sha256(retried.content).hexdigest() in emulator.served
        assert client.get(url).status_code == 404


def test_without_keep_images_faulty_urls_keep_failing_the_same_way(client: httpx.Client) -> None:
    with GptImageEmulator(api_key=KEY, keep_images=False) as emulator:
        emulator.add_fault(Fault.expired_url(403))
        emulator.add_fault(Fault.truncated_image())
        expired = generate(client, emulator)
        truncated = generate(client, emulator)
        for _ in range(2):
            assert download(client, expired).status_code == 403
            half = download(client, truncated)
            assert half.status_code == 200
            assert half.content.startswith(b"\x89PNG")


# -- HTTP controls and the command line ---------------------------------------------------------


def test_stats_endpoint_reports_the_counters(client: httpx.Client) -> None:
    with GptImageEmulator(api_key=KEY, rate_limit=2) as emulator:
        responses = [generate(client, emulator) for _ in range(3)]
        download(client, responses[0])
        stats = client.get(emulator.base_url + "/__emulator__/stats")
        assert stats.status_code == 200
        assert stats.json() == {
            "calls": 3,
            "billed": 2,
            "rate_limited": 1,
            "peak_concurrency": 1,
            "image_downloads": 1,
            "batch_requests": 0,
            "batches_created": 0,
        }
        assert stats.json() == emulator.stats
        assert len(emulator.calls) == 3  # reading the stats is not a call


def test_reset_endpoint_clears_records_and_refills(client: httpx.Client) -> None:
    with GptImageEmulator(api_key=KEY, rate_limit=1) as emulator:
        assert [generate(client, emulator).status_code for _ in range(2)] == [200, 429]
        reset = client.post(emulator.base_url + "/__emulator__/reset")
        assert reset.status_code == 200
        assert reset.json() == {}
        assert emulator.calls == []
        assert emulator.served == {}
        assert generate(client, emulator).status_code == 200
        stats = client.get(emulator.base_url + "/__emulator__/stats").json()
        assert stats["calls"] == 1
        assert stats["rate_limited"] == 0


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        assert selector.select(timeout), "the emulator printed no URL in time"
    return process.stdout.readline().strip()


def test_command_line_serves_limits_pads_and_stops_on_sigterm(client: httpx.Client) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect_gpt_image.testing.emulator",
            "--port",
            "0",
            "--api-key",
            KEY,
            "--rate-limit",
            "2",
            "--image-bytes",
            "100000",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = _first_line(process, timeout=30)
        assert base_url.startswith("http://127.0.0.1:")
        url = base_url + "/generate"
        responses = [client.post(url, json={"prompt": "p"}, headers=HEADERS) for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 429]
        image = client.get(responses[0].json()["url"])
        assert len(image.content) >= 100_000
        assert client.get(responses[0].json()["url"]).status_code == 404  # not kept
        stats = client.get(base_url + "/__emulator__/stats").json()
        assert stats == {
            "calls": 3,
            "billed": 2,
            "rate_limited": 1,
            "peak_concurrency": 1,
            "image_downloads": 2,
            "batch_requests": 0,
            "batches_created": 0,
        }
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
