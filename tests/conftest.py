"""Real parts for every test: Prefect's test harness, the API emulator on loopback, and
`rclone serve s3` over a temporary folder.

The only thing not real is RapidAPI itself, which cannot be reached (or paid for)
from tests: `prefect_gpt_image.testing.GptImageEmulator` stands in for it.

Two tiers: the default run is quick, and retries in it do not wait, nor do a run's looks at
its batches (a test whose subject is the production delays is marked
`production_retry_delays`). Tests that start servers,
workers or machines of their own, kill runs or race them, are marked `scenario` (`e2e` and
`slow` imply it) and run with `pytest -m scenario`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Prefect reads its settings when imported: keep its home, and so the result
# cache, inside this test session.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="prefect-gpt-image-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-home")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION_DIR / "prefect-home" / "storage")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "0.3"
for _name in ("RAPIDAPI_KEY", "RAPIDAPI_HOST", "RAPIDAPI_BASE_URL", "PREFECT_API_URL"):
    os.environ.pop(_name, None)

import pytest  # noqa: E402
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402
from prefect_aws import S3Bucket  # noqa: E402

from prefect_gpt_image import (  # noqa: E402
    OpenAICredentials,
    RapidAPICredentials,
    _batch_jobs,
    _retry_policy,
    _throttle,
)
from prefect_gpt_image.model_table import MODELS  # noqa: E402
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server  # noqa: E402

API_KEY = "test-key-5f3a9c0e7b214d8e"
"""Distinctive, so that a test can search everything written for it."""


SCENARIO_KINDS = ("e2e", "slow")
FAST_TIER_WORKERS = 2
"""Processes that share the fast tier (`-n auto`): most of its time is spent waiting on
servers and subprocesses, so two keep two cores busy."""


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Workers for the whole fast tier; none for a file or test picked by hand (one Prefect
    harness is quicker to start than two), nor for the scenario tier, whose tests start
    servers and processes of their own and time them."""
    whole_fast_tier = (
        config.args_source is pytest.Config.ArgsSource.TESTPATHS
        and config.getoption("markexpr") == "not scenario"
    )
    return FAST_TIER_WORKERS if whole_fast_tier else 0


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`e2e` and `slow` tests belong to the scenario tier, which the default run leaves out."""
    for item in items:
        if any(item.get_closest_marker(name) for name in SCENARIO_KINDS):
            item.add_marker(pytest.mark.scenario)


@pytest.fixture(autouse=True)
def quick_retries(request: pytest.FixtureRequest) -> Iterator[None]:
    """The retry policy's delay tables at zero, for tests that are not about them.

    The tables are shrunk in place: Prefect's tasks hold the same lists, and so does every
    caller of `call_with_retries`, so each retry still happens, only without its wait.
    """
    if request.node.get_closest_marker("production_retry_delays"):
        yield
        return
    tables = {
        name: table
        for name, table in vars(_retry_policy).items()
        if name.endswith("_DELAYS") and not name.startswith("_")
    }
    saved = {}
    for name, table in tables.items():
        assert isinstance(table, list), f"_retry_policy.{name} must be a list to be shrunk"
        saved[name] = list(table)
        table[:] = [0.0] * len(table)
    try:
        yield
    finally:
        for name, table in tables.items():
            table[:] = saved[name]


@pytest.fixture(autouse=True)
def quick_batch_polls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run looks at its batches every 0.2 s, not after 1, 2, 5... s, in tests that are not
    about the polls' pace: the emulator's batches take a second or less."""
    if request.node.get_closest_marker("production_retry_delays"):
        return
    monkeypatch.setattr(_batch_jobs, "POLL_DELAYS", (0.2,))
    monkeypatch.setattr(_batch_jobs, "POLL_EVERY_SECONDS", 0.2)


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    yield _SESSION_DIR
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(session_dir: Path) -> Iterator[None]:
    with (
        prefect_test_harness(server_startup_timeout=180),
        temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        yield


@pytest.fixture(scope="session")
def s3_server(session_dir: Path) -> Iterator[LocalS3Server]:
    with LocalS3Server(session_dir / "s3") as server:
        yield server


@pytest.fixture(scope="session")
def emulator() -> Iterator[GptImageEmulator]:
    # Tests draw images smaller than the API's least flexible size, for speed; the tests of
    # that rule set `min_pixels` back to the API's own.
    with GptImageEmulator(api_key=API_KEY, min_pixels=16 * 16) as server:
        yield server


@pytest.fixture
def api(emulator: GptImageEmulator) -> Iterator[GptImageEmulator]:
    """The emulator, with no faults and no records from earlier tests, and a client
    that has learned no rate from them."""
    _throttle._throttles.clear()
    emulator.reset()
    emulator.shape, emulator.latency, emulator.subscribed = "url", 0.0, True
    emulator.rate_limit, emulator.rate_limit_headers = None, True
    emulator.gateway, emulator.echo_keys = None, False
    models, min_pixels = dict(emulator.models), emulator.min_pixels
    yield emulator
    emulator.reset()
    emulator.models, emulator.min_pixels = models, min_pixels


@pytest.fixture
def credentials(api: GptImageEmulator) -> RapidAPICredentials:
    """Credentials pointing at the emulator.

    Each test gets a model name of its own, which is part of the cache key, so that
    no test is served images another test generated.
    """
    return RapidAPICredentials(
        api_key=API_KEY,
        base_url=api.base_url,
        model=f"gpt-image-test-{uuid.uuid4().hex[:8]}",
        timeout_seconds=10,
    )


@pytest.fixture
def model_route(api: GptImageEmulator) -> Callable[..., OpenAICredentials]:
    """Makes an OpenAI-protocol route to the emulator for a model of this test's own, named
    after a built-in table entry (so the emulator treats it as that family) and described
    by the block as that entry, with `changes` to it: a block's override."""

    def make(entry: str, **changes: Any) -> OpenAICredentials:
        model = f"{entry}-test-{uuid.uuid4().hex[:8]}"
        api.models[model] = None
        return OpenAICredentials(
            api_key=API_KEY,
            base_url=api.openai_base_url,
            model=model,
            models={model: MODELS[entry].model_copy(update=changes)},
            timeout_seconds=10,
        )

    return make


@pytest.fixture
def openai_credentials(model_route: Callable[..., OpenAICredentials]) -> OpenAICredentials:
    """An OpenAI-protocol route to the emulator, for a model of this test's own that the
    emulator serves and the block describes as gpt-image-2 (a new model is a block edit)."""
    return model_route("gpt-image-2")


@pytest.fixture
def batch_api(api: GptImageEmulator, monkeypatch: pytest.MonkeyPatch) -> GptImageEmulator:
    """The emulator, with batches that end within a second; its batch settings are put
    back afterwards (`reset()` keeps them)."""
    monkeypatch.setattr(api, "batch_processing_seconds", 0.5)
    monkeypatch.setattr(api, "batch_expire_after", None)
    return api


@pytest.fixture
def bucket(s3_server: LocalS3Server) -> S3Bucket:
    """A new, empty bucket for each test."""
    return s3_server.bucket_block(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def user_env(
    api: GptImageEmulator, credentials: RapidAPICredentials, s3_server: LocalS3Server
) -> dict[str, str]:
    """A user's shell, for the command line: the key and endpoint in the environment,
    AWS_* for the bucket, and this session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    return {
        **os.environ,
        "RAPIDAPI_KEY": credentials.api_key.get_secret_value(),
        "RAPIDAPI_BASE_URL": api.base_url,
        "GPT_IMAGE_MODEL": credentials.model,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
    }
