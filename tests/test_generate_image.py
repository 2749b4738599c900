"""The generation task against the emulator: answer shapes, retries, errors and caching."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from pydantic import SecretStr

from prefect_gpt_image import (
    GeneratedImage,
    ImageRequest,
    RapidAPICredentials,
    agenerate_image,
    generate_image,
)
from prefect_gpt_image.errors import (
    AuthenticationError,
    BadRequestError,
    EndpointNotFoundError,
    InvalidImageError,
    InvalidRequestError,
    NotSubscribedError,
    PromptRejectedError,
    QuotaExceededError,
)
from prefect_gpt_image.testing import RESPONSE_SHAPES, Fault, GptImageEmulator

# Prefect's own retries, without the production back-off, so the suite stays quick.
# The delays themselves are Prefect's business; which errors are retried is ours.
fast_generate = generate_image.with_options(retry_delay_seconds=0)


@flow
def generate_in_flow(request: Any, credentials: RapidAPICredentials, task: Any = None) -> Any:
    return (task or fast_generate)(request, credentials)


@dataclass
class Outcome:
    """How one task run ended, taken out of its flow so the flow itself completes."""

    value: Any
    failed: bool
    task_run_id: UUID

    def state_names(self) -> list[str]:
        return [state.name for state in self.states()]

    def states(self) -> list[State]:
        """The run's states as Prefect's API recorded them; it records them a moment later."""
        deadline = time.monotonic() + 15
        with get_client(sync_client=True) as client:
            while True:
                states = client.read_task_run_states(self.task_run_id)
                if states[-1].is_final() or time.monotonic() > deadline:
                    return states
                time.sleep(0.2)


def run_task(request: Any, credentials: RapidAPICredentials, task: Any = None) -> Outcome:
    @flow
    def one(request: Any) -> Outcome:
        state = (task or fast_generate)(request, credentials, return_state=True)
        return Outcome(
            value=state.result(raise_on_failure=False),
            failed=state.is_failed(),
            task_run_id=state.state_details.task_run_id,
        )

    return one(request)


@pytest.mark.parametrize("shape", RESPONSE_SHAPES)
def test_each_answer_shape_gives_the_served_image(
    shape: str, api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    api.shape = shape
    image = generate_in_flow(f"a lighthouse at dawn ({shape})", credentials)

    assert isinstance(image, GeneratedImage)
    assert api.served[image.sha256] == image.data
    assert hashlib.sha256(image.data).hexdigest() == image.sha256
    assert (image.media_type, image.width, image.height) == ("image/png", 1024, 1024)
    assert image.model == credentials.model
    assert len(api.calls) == 1


@pytest.mark.parametrize("image_format", ["jpeg", "webp"])
def test_jpeg_and_webp_are_recognised(
    image_format: str, api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    api.image_format = image_format
    try:
        image = generate_in_flow(
            ImageRequest(prompt=f"a red kite, {image_format}", width=1536, height=1024),
            credentials,
        )
    finally:
        api.image_format = "png"
    assert image.media_type == f"image/{image_format}"
    assert (image.width, image.height) == (1536, 1024)
    assert image.extension == {"jpeg": "jpg", "webp": "webp"}[image_format]


def test_request_carries_headers_size_and_extras(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    creds = credentials.model_copy(update={"default_extras": {"quality": "low", "style": "flat"}})
    request = ImageRequest(prompt="a teapot", width=1024, height=1536, extras={"quality": "high"})
    generate_in_flow(request, creds)

    (call,) = api.calls
    assert call.body == {
        "prompt": "a teapot",
        "width": 1024,
        "height": 1536,
        "quality": "high",
        "style": "flat",
    }
    assert call.headers["x-rapidapi-host"] == "gpt-image-1-5.p.rapidapi.com"
    assert call.headers["x-rapidapi-key"] == "<redacted>"  # present, and the right one
    assert call.status == 200


@pytest.mark.parametrize(
    "fault",
    [
        Fault.rate_limited(retry_after=None),
        Fault.server_error(500),
        Fault.server_error(502),
        Fault.server_error(503),
        Fault.server_error(504),
        Fault.malformed_body(),
        Fault.no_image(),
        Fault.expired_url(404),
        Fault.expired_url(403),
    ],
    ids=lambda fault: f"{fault.kind}-{fault.status}",
)
def test_transient_failures_are_retried(
    fault: Fault, api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    api.add_fault(fault, times=2)
    image = generate_in_flow("a windmill in a tulip field", credentials)

    assert [call.fault for call in api.calls] == [fault.kind, fault.kind, None]
    assert api.served[image.sha256] == image.data


def test_timeouts_are_retried(api: GptImageEmulator, credentials: RapidAPICredentials) -> None:
    creds = credentials.model_copy(update={"timeout_seconds": 0.5})
    api.add_fault(Fault.stall(1.5))
    image = generate_in_flow("a slow snail", creds)

    assert api.served[image.sha256] == image.data
    # The stalled call is recorded once the emulator answers it, after the client gave up.
    deadline = time.monotonic() + 5
    while len(api.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [call.fault for call in api.calls] == ["stall", None]


def test_connection_errors_are_retried_then_reported(
    credentials: RapidAPICredentials, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens on this port: every attempt fails to connect.
    with GptImageEmulator() as gone:
        dead_url = gone.base_url
    creds = credentials.model_copy(update={"base_url": dead_url})
    with caplog.at_level(logging.INFO, logger="prefect.task_runs"):
        outcome = run_task("unreachable", creds)

    assert outcome.failed
    assert "Could not reach" in str(outcome.value)
    # The engine's own account of each attempt: the server's state history may merge
    # states that come milliseconds apart.
    retries = [r.getMessage() for r in caplog.records if "will start" in r.getMessage()]
    assert [m.split("Retry ")[1].split(" ")[0] for m in retries] == ["1/4", "2/4", "3/4", "4/4"]


def test_retry_after_is_honoured(api: GptImageEmulator, credentials: RapidAPICredentials) -> None:
    api.add_fault(Fault.rate_limited(retry_after=2))
    started = time.monotonic()
    generate_in_flow("a patient heron", credentials)

    assert time.monotonic() - started >= 2.0
    assert [call.status for call in api.calls] == [429, 200]


@pytest.mark.production_retry_delays
def test_default_policy_retries_with_backoff_visible_in_prefect(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    """The production task, delays and all: the retry shows as AwaitingRetry in Prefect."""
    api.add_fault(Fault.server_error(503))
    outcome = run_task("a retried robin", credentials, task=generate_image)

    assert not outcome.failed
    history = outcome.state_names()
    assert "AwaitingRetry" in history
    assert history[-1] == "Completed"
    (waiting,) = [state for state in outcome.states() if state.name == "AwaitingRetry"]
    assert waiting.state_details.scheduled_time is not None
    delay = (waiting.state_details.scheduled_time - waiting.timestamp).total_seconds()
    assert 0.5 <= delay <= 1.5  # the first delay, 1 s, give or take half of it (the jitter)


@pytest.mark.parametrize(
    ("fault", "error", "advice"),
    [
        (Fault.unauthorized(), AuthenticationError, "rejected the API key"),
        (Fault.not_subscribed(), NotSubscribedError, "Subscribe to the API"),
        (Fault.bad_request("width must be one of ..."), BadRequestError, "width must be"),
        (Fault.quota_exceeded(), QuotaExceededError, "quota is spent"),
        (Fault.not_an_image(), InvalidImageError, "not a readable image"),
        (Fault.truncated_image(), InvalidImageError, "not a readable image"),
    ],
    ids=lambda v: v.kind if isinstance(v, Fault) else None,
)
def test_permanent_failures_fail_at_once(
    fault: Fault,
    error: type[Exception],
    advice: str,
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
) -> None:
    api.add_fault(fault, times=5)
    exc = run_task("an unlucky lemur", credentials).value
    assert isinstance(exc, error)
    assert advice in str(exc)
    assert len(api.calls) == 1


def test_rejected_prompt_says_so(api: GptImageEmulator, credentials: RapidAPICredentials) -> None:
    exc = run_task("[reject] something the model refuses", credentials).value
    assert isinstance(exc, PromptRejectedError)
    assert "refused the prompt" in str(exc) and "safety system" in str(exc)
    assert len(api.calls) == 1


def test_wrong_host_points_at_the_configuration(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    creds = credentials.model_copy(update={"api_host": "gpt-image-9.p.rapidapi.com"})
    exc = run_task("a retired model", creds).value

    assert isinstance(exc, EndpointNotFoundError)
    assert "api_host" in str(exc)
    assert len(api.calls) == 1


def test_unsupported_size_is_refused_before_any_call(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    request = ImageRequest(prompt="a square-ish cat", width=1000, height=1000)
    exc = run_task(request, credentials).value

    assert isinstance(exc, InvalidRequestError)
    assert "1000x1000" in str(exc) and "1536x1024" in str(exc)
    assert api.calls == []


def test_too_large_image_is_refused(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    creds = credentials.model_copy(update={"max_image_bytes": 1000})
    exc = run_task("a huge mural", creds).value

    assert isinstance(exc, InvalidImageError)
    assert "max_image_bytes" in str(exc)
    assert len(api.calls) == 1


def test_cache_serves_later_runs_without_calls(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    first = generate_in_flow("a cached cactus", credentials)
    second = generate_in_flow("a cached cactus", credentials)

    assert second.data == first.data
    assert len(api.calls) == 1


def test_rotating_the_key_keeps_the_cache(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    first = generate_in_flow("a key-independent koala", credentials)
    rotated = credentials.model_copy(update={"api_key": SecretStr("a-key-the-emulator-rejects")})
    second = generate_in_flow("a key-independent koala", rotated)

    assert second.sha256 == first.sha256
    assert len(api.calls) == 1


def test_size_extras_and_model_are_part_of_the_cache_key(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    prompt = "a distinct dolphin"
    generate_in_flow(prompt, credentials)
    generate_in_flow(ImageRequest(prompt=prompt, width=1536), credentials)
    generate_in_flow(ImageRequest(prompt=prompt, extras={"quality": "high"}), credentials)
    generate_in_flow(prompt, credentials.model_copy(update={"model": "gpt-image-2"}))

    assert len(api.calls_for(prompt)) == 4


def test_failures_are_not_cached(api: GptImageEmulator, credentials: RapidAPICredentials) -> None:
    api.add_fault(Fault.bad_request("try again later"))
    assert run_task("a second-chance seal", credentials).failed

    image = generate_in_flow("a second-chance seal", credentials)
    assert api.served[image.sha256] == image.data
    assert len(api.calls) == 2


def test_refresh_cache_generates_again(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    first = generate_in_flow("a refreshed fern", credentials)
    second = generate_in_flow(
        "a refreshed fern", credentials, task=fast_generate.with_options(refresh_cache=True)
    )

    assert second.sha256 != first.sha256
    assert len(api.calls) == 2


def test_credentials_from_the_environment(
    api: GptImageEmulator, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAPIDAPI_KEY", api_key)
    monkeypatch.setenv("RAPIDAPI_BASE_URL", api.base_url)
    monkeypatch.setenv("GPT_IMAGE_MODEL", "gpt-image-env-test")

    @flow
    def from_env() -> GeneratedImage:
        return fast_generate("an environmental eel")

    image = from_env()
    assert image.model == "gpt-image-env-test"
    assert api.served[image.sha256] == image.data


def test_a_stalled_download_is_retried_without_paying_again(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    creds = credentials.model_copy(update={"timeout_seconds": 1.0})
    api.add_fault(Fault.slow_download(2.5))
    image = generate_in_flow("a dawdling dormouse", creds)

    assert api.billed == 1
    assert api.image_downloads == 2
    assert api.served[image.sha256] == image.data


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_a_task_run_works_out_its_request_and_routes_once(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    monkeypatch: pytest.MonkeyPatch,
    twin: str,
) -> None:
    """The cache key and the call share what they work out: the routes (a saved route is a
    read from Prefect's API) are resolved, and an edit's inputs read, once per task run,
    through a retry too."""
    from prefect_gpt_image.tasks import generate as module

    resolved: list[object] = []
    resolve = module.resolve_routes
    monkeypatch.setattr(
        module, "resolve_routes", lambda value: resolved.append(value) or resolve(value)
    )
    api.add_fault(Fault.server_error(503))

    if twin == "sync":
        image = generate_in_flow("a once-resolved rhino", credentials)
    else:

        @flow
        async def async_flow() -> GeneratedImage:
            task = agenerate_image.with_options(retry_delay_seconds=0)
            return await task("a once-resolved rhino", credentials)

        image = asyncio.run(async_flow())

    assert image.paid_calls == 1
    assert len(api.calls) == 2
    assert resolved == [credentials]
