"""Beyond one process: a Dask cluster, a cache shared through S3, Prefect's global limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.settings import PREFECT_API_URL
from prefect_aws import S3Bucket
from prefect_dask import DaskTaskRunner

from prefect_gpt_image import RapidAPICredentials, generate_image, generate_images
from prefect_gpt_image.errors import ConfigurationError, ServerError
from prefect_gpt_image.testing import Fault, GptImageEmulator, LocalS3Server


def dask_cluster_of_processes() -> DaskTaskRunner:
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": 2,
            "processes": True,
            "threads_per_worker": 2,
            "dashboard_address": None,
        }
    )


@pytest.mark.scenario
def test_the_flow_runs_unchanged_on_a_dask_cluster_of_processes(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Worker processes find this session's Prefect server the way a user's do.
    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    api.latency = 0.2
    prompts = [f"a distributed dormouse #{n}" for n in range(6)]

    on_dask = generate_images.with_options(task_runner=dask_cluster_of_processes())
    first = on_dask(prompts, bucket=bucket, credentials=credentials, limits={"max_concurrency": 3})

    assert len(first.images) == 6 and api.billed == 6
    # Workers have a throttle each, so across processes the flow's window is the bound.
    assert api.peak_concurrency <= 3
    client = s3_server.boto3_client()
    for image in first.images:
        body = client.get_object(Bucket=bucket.bucket_name, Key=image.key)["Body"].read()
        assert body == api.served[image.sha256]

    # Results persisted by one worker serve another run's workers: nothing is paid again.
    again = generate_images.with_options(task_runner=dask_cluster_of_processes())(
        prompts, bucket=bucket, credentials=credentials, prefix="again"
    )
    assert (again.generated, again.from_cache, api.billed) == (0, 6, 6)
    assert all(image.key.startswith("again/") for image in again.images)


@pytest.mark.scenario
def test_an_error_on_a_dask_worker_comes_back_whole(
    api: GptImageEmulator, credentials: RapidAPICredentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker pickles the task's error and the flow unpickles it: a type with keyword-only
    fields once came back as an unpickling TypeError, and the real error was lost."""
    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    api.add_fault(Fault.server_error(503))
    once = generate_image.with_options(retries=0)

    @flow(task_runner=dask_cluster_of_processes())
    def one_failing_generation() -> BaseException | None:
        future = once.submit("a doomed dask dove", credentials=credentials)
        future.wait()
        return future.state.result(raise_on_failure=False)  # type: ignore[return-value]

    error = one_failing_generation()

    assert type(error) is ServerError, repr(error)
    assert str(error).startswith("The API or RapidAPI's gateway failed (503).")
    assert (error.status_code, error.retryable, error.billed) == (503, True, False)
    assert [call.status for call in api.calls] == [503]


RUN_THE_PROMPTS = """
import json, sys
from prefect_gpt_image import generate_images
prompts, bucket, credentials, cache, prefix = json.loads(sys.argv[1])
report = generate_images(
    prompts, bucket=bucket, credentials=credentials, cache={"storage": cache}, prefix=prefix
)
print(json.dumps({"generated": report.generated, "from_cache": report.from_cache}))
"""


@pytest.mark.scenario
def test_machines_sharing_an_s3_cache_pay_once(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    tmp_path: Path,
) -> None:
    """Two processes with homes (and local result storage) of their own stand for two
    machines; the cache lives in a bucket both reach."""
    suffix = uuid.uuid4().hex[:8]
    credentials.save(f"creds-{suffix}")
    bucket.save(f"images-{suffix}")
    cache = s3_server.bucket_block(f"cache-{suffix}", bucket_folder="gpt-image-cache")
    cache.save(f"cache-{suffix}")
    prompts = ["a shared shell", "a shared sail", "a shared sextant"]

    def run_on_machine(name: str) -> dict[str, int]:
        home = tmp_path / name
        env = {
            **os.environ,
            "PREFECT_API_URL": str(PREFECT_API_URL.value()),
            "PREFECT_HOME": str(home),
            "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        }
        args = [prompts, f"images-{suffix}", f"creds-{suffix}", f"cache-{suffix}", name]
        done = subprocess.run(
            [sys.executable, "-c", RUN_THE_PROMPTS, json.dumps(args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    assert run_on_machine("machine-a") == {"generated": 3, "from_cache": 0}
    assert run_on_machine("machine-b") == {"generated": 0, "from_cache": 3}
    assert api.billed == 3
    cached = s3_server.boto3_client().list_objects_v2(Bucket=cache.bucket_name)
    assert len(cached["Contents"]) == 3
    assert all(o["Key"].startswith("gpt-image-cache/gpt-image-") for o in cached["Contents"])
    assert not list((tmp_path / "machine-b" / "storage").glob("*"))


def global_limit(limit: int, slot_decay_per_second: float = 0.0) -> str:
    """A new Prefect global concurrency limit; returns its name."""
    name = f"gpt-image-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(
                name=name, limit=limit, slot_decay_per_second=slot_decay_per_second
            )
        )
    return name


def test_a_global_concurrency_limit_caps_requests_across_runs(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    name = global_limit(2)
    api.latency = 0.3
    prompts = [f"a globally limited lemur #{n}" for n in range(8)]

    report = generate_images(
        prompts,
        bucket=bucket,
        credentials=credentials,
        limits={"max_concurrency": 8, "global_concurrency_limit": name},
    )

    assert len(report.images) == 8
    assert api.peak_concurrency == 2


@pytest.mark.parametrize("argument", ["global_concurrency_limit", "global_rate_limit"])
def test_an_unknown_global_limit_is_refused_before_any_paid_call(
    argument: str, api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    with pytest.raises(ConfigurationError, match="No Prefect global concurrency limit named"):
        generate_images(
            ["a lost limit"],
            bucket=bucket,
            credentials=credentials,
            limits={argument: "no-such-limit"},
        )
    assert api.calls == []


def test_a_rate_limit_needs_slot_decay(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    name = global_limit(4)
    with pytest.raises(ConfigurationError, match="has no slot decay"):
        generate_images(
            ["a decayless dodo"],
            bucket=bucket,
            credentials=credentials,
            limits={"global_rate_limit": name},
        )
    assert api.calls == []


def test_a_global_rate_limit_spaces_requests_across_runs(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    name = global_limit(1, slot_decay_per_second=2)
    prompts = [f"a rate-limited rook #{n}" for n in range(5)]

    started = time.monotonic()
    report = generate_images(
        prompts,
        bucket=bucket,
        credentials=credentials,
        limits={"max_concurrency": 5, "global_rate_limit": name},
    )

    assert len(report.images) == 5
    # One slot that frees itself every half second: five requests need two seconds at least.
    assert time.monotonic() - started >= 2.0
