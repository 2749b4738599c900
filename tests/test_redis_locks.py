"""Pay once across machines: the generation cache's locks in a real `redis-server`.

Two processes with homes of their own stand for two machines; they share the cache in a
bucket, and the locks in Redis. File locks cannot serialize them: each home has its own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL
from prefect_aws import S3Bucket

from prefect_gpt_image import RapidAPICredentials, generate_images
from prefect_gpt_image.errors import ConfigurationError
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server


def redis_server_binary() -> str:
    """Debian's redis-server; installed here on a machine that has apt and runs as root (CI)."""
    if found := shutil.which("redis-server"):
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs Debian's redis-server package (apt-get install redis-server)")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "redis-server"],
        check=True,
        capture_output=True,
        env=environment,
    )
    return shutil.which("redis-server") or pytest.fail("redis-server did not install")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on loopback, without persistence, stopped by its pid."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [
            redis_server_binary(),
            *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--dir", str(directory)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)


RUN_THE_PROMPTS = """
import json, sys, time
from pathlib import Path
from prefect_gpt_image import generate_images
prompts, bucket, credentials, cache, redis_lock_url, ready, go = json.loads(sys.argv[1])
Path(ready).touch()
while not Path(go).exists():  # both machines start their run at the same moment
    time.sleep(0.01)
report = generate_images(
    prompts, bucket=bucket, credentials=credentials,
    cache={"storage": cache, "redis_lock_url": redis_lock_url},
    limits={"max_concurrency": 10},
)
print(json.dumps({"generated": report.generated, "from_cache": report.from_cache}))
"""


def run_two_machines_at_once(
    tmp_path: Path,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    prompts: list[str],
    redis_lock_url: str | None,
) -> list[dict[str, int]]:
    suffix = uuid.uuid4().hex[:8]
    credentials.save(f"creds-{suffix}")
    bucket.save(f"images-{suffix}")
    cache = s3_server.bucket_block(f"cache-{suffix}", bucket_folder="gpt-image-cache")
    cache.save(f"cache-{suffix}")
    go = tmp_path / "go"
    machines = []
    for name in ("machine-a", "machine-b"):
        ready = tmp_path / f"{name}-ready"
        args = json.dumps(
            [
                *(prompts, f"images-{suffix}", f"creds-{suffix}", f"cache-{suffix}"),
                *(redis_lock_url, str(ready), str(go)),
            ]
        )
        home = tmp_path / name
        env = {
            **os.environ,
            "PREFECT_API_URL": str(PREFECT_API_URL.value()),
            "PREFECT_HOME": str(home),
            "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage"),
        }
        machines.append(
            subprocess.Popen(
                [sys.executable, "-c", RUN_THE_PROMPTS, args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"{name}-ready").exists() for name in ("machine-a", "machine-b")):
        assert time.monotonic() < deadline, "the machines did not start"
        time.sleep(0.05)
    go.touch()
    reports = []
    for machine in machines:
        out, err = machine.communicate(timeout=300)
        assert machine.returncode == 0, err[-3000:]
        reports.append(dict(json.loads(out.strip().splitlines()[-1])))
    return reports


@pytest.mark.scenario
def test_two_machines_asking_for_the_same_new_images_at_once_pay_once(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
    redis_url: str,
    tmp_path: Path,
) -> None:
    api.latency = 1.0  # both machines ask for every image while the other is paying for it
    prompts = [f"a contended cassowary #{n}" for n in range(20)]

    reports = run_two_machines_at_once(tmp_path, credentials, bucket, s3_server, prompts, redis_url)

    assert api.billed == 20
    assert sum(r["generated"] for r in reports) == 20
    assert sum(r["generated"] + r["from_cache"] for r in reports) == 40


def test_an_unreachable_redis_is_refused_before_any_paid_call(
    api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    with pytest.raises(ConfigurationError, match="Cannot reach the Redis") as refused:
        generate_images(
            ["a lockless lyrebird"],
            bucket=bucket,
            credentials=credentials,
            cache={"redis_lock_url": f"redis://:hunter2@127.0.0.1:{closed_port}/0"},
        )
    assert "hunter2" not in str(refused.value)
    assert api.calls == []
