"""Faults a run must survive: a dead key, an S3 outage, a killed run, two runs at once."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from prefect_aws import S3Bucket

from prefect_gpt_image import ImageRequest, RapidAPICredentials, generate_images
from prefect_gpt_image._client import RapidAPIClient
from prefect_gpt_image._url_safety import check_image_url
from prefect_gpt_image.errors import RunFailedError, UnsafeImageURLError
from prefect_gpt_image.testing import Fault, GptImageEmulator, LocalS3Server

COMMAND = str(Path(sys.executable).parent / "prefect-gpt-image")


@pytest.mark.parametrize(
    ("fault", "error_type"),
    [
        (Fault.unauthorized(), "AuthenticationError"),
        (Fault.not_subscribed(), "NotSubscribedError"),
        (Fault.quota_exceeded(), "QuotaExceededError"),
    ],
    ids=["bad-key", "not-subscribed", "quota-spent"],
)
def test_a_dead_key_stops_the_run(
    fault: Fault,
    error_type: str,
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
) -> None:
    api.add_fault(fault, times=1000)
    prompts = [f"a doomed dormouse #{n}" for n in range(40)]

    with pytest.raises(RunFailedError) as raised:
        generate_images(
            prompts, bucket=bucket, credentials=credentials, limits={"max_concurrency": 2}
        )

    # The calls submitted when the first answer came back: the flow keeps twice
    # max_concurrency tasks ready, so that the API never waits for a task to start.
    assert len(api.calls) <= 4
    report = raised.value.report
    stages = [failure.stage for failure in report.failures]
    assert len(stages) == 40 and stages.count("not attempted") >= 36
    assert {f.error_type for f in report.failures} == {error_type}
    message = str(raised.value)
    assert message.startswith("The run stopped: ")
    assert "of 40 prompts were not attempted" in message


def test_images_generated_while_s3_is_down_are_not_paid_for_again(
    tmp_path: Path, api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    prompts = ["an outage owl", "an outage otter", "an outage oriole"]
    api.latency = 1.0
    with LocalS3Server(tmp_path / "s3") as s3:
        bucket = s3.bucket_block("outage")

        def stop_s3_once_the_api_is_called() -> None:
            while api.peak_concurrency == 0:  # a generation has started
                time.sleep(0.01)
            s3.stop()

        stopper = threading.Thread(target=stop_s3_once_the_api_is_called, daemon=True)
        stopper.start()
        with pytest.raises(RunFailedError) as raised:
            generate_images(prompts, bucket=bucket, credentials=credentials)
        stopper.join()
        assert api.billed == 3
        # The report still comes out, with the manifest kept locally.
        report = raised.value.report
        assert {f.stage for f in report.failures} == {"upload"}
        assert (report.manifest_uri or "").startswith("file://")
        assert (
            Path((report.manifest_uri or "").removeprefix("file://")).read_text().count("\n") == 3
        )

        s3.start()
        report = generate_images(prompts, bucket=bucket, credentials=credentials)

    assert api.billed == 3
    assert (report.generated, report.from_cache) == (0, 3)
    for image in report.images:
        assert s3.object_path("outage", image.key).read_bytes() == api.served[image.sha256]


class ThrottlingProxy(ThreadingHTTPServer):
    """Stands between boto3 and the S3 server, answering the first `throttle` PUTs with
    503 SlowDown as S3 does under load, and forwarding everything else untouched (the
    Host header included, so signatures still verify)."""

    daemon_threads = True

    def __init__(self, target: str, throttle: int) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        parts = urlsplit(target)
        self.target = (parts.hostname or "", parts.port or 80)
        self.throttle = throttle
        self.throttled = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as the emulator: no 40 ms wait on every answer
    server: ThrottlingProxy

    def do_PUT(self) -> None:
        self._forward()

    do_GET = do_HEAD = do_POST = do_DELETE = do_PUT

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == "PUT" and self.server.throttled < self.server.throttle:
            self.server.throttled += 1
            slow_down = b"<Error><Code>SlowDown</Code><Message>Reduce your rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(slow_down)))
            self.end_headers()
            self.wfile.write(slow_down)
            return
        upstream = http.client.HTTPConnection(*self.server.target, timeout=30)
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            upstream.putheader(name, value)
        upstream.endheaders(body)
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("connection", "transfer-encoding"):
                self.send_header(name, value)
        if answer.getheader("Content-Length") is None:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_s3_throttling_is_retried(
    api: GptImageEmulator, credentials: RapidAPICredentials, s3_server: LocalS3Server
) -> None:
    bucket_name = f"throttled-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket_name)
    proxy = ThrottlingProxy(s3_server.endpoint_url, throttle=3)
    creds = s3_server.aws_credentials()
    creds.aws_client_parameters.endpoint_url = proxy.url
    try:
        report = generate_images(
            ["a throttled thrush"],
            bucket=S3Bucket(bucket_name=bucket_name, credentials=creds),
            credentials=credentials,
        )
    finally:
        proxy.shutdown()

    assert proxy.throttled == 3
    (image,) = report.images
    assert s3_server.object_path(bucket_name, image.key).read_bytes() == api.served[image.sha256]
    assert api.billed == 1


def cli_run(s3: LocalS3Server, folder: Path, prompts: list[str]) -> tuple[str, list[str]]:
    """A new bucket, and the command line that generates `prompts` into it."""
    bucket = f"cli-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(bucket)
    (folder / "prompts.txt").write_text("\n".join(prompts), "utf-8")
    return bucket, [COMMAND, "generate", str(folder / "prompts.txt"), "--bucket", f"s3://{bucket}"]


@pytest.mark.scenario
def test_a_killed_run_resumes_without_paying_twice(
    tmp_path: Path, api: GptImageEmulator, s3_server: LocalS3Server, user_env: dict[str, str]
) -> None:
    prompts = [f"a resumable raccoon #{n}" for n in range(100)]
    bucket, args = cli_run(s3_server, tmp_path, prompts)
    args += ["--max-concurrency", "4"]
    api.latency = 0.2

    run = subprocess.Popen(args, env=user_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while api.billed < 30 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    billed_at_kill = api.billed
    assert 30 <= billed_at_kill < 100

    again = subprocess.run(args, env=user_env, capture_output=True, text=True, timeout=300)

    assert again.returncode == 0, again.stderr[-2000:]
    assert "100 stored, 0 failed" in again.stdout
    paid_twice = [p for p in prompts if api.billed_for(p) > 1]
    # At most the generations in flight at the kill: four at the API, and as many more
    # answered but not yet persisted (the flow keeps twice max_concurrency in flight).
    assert len(paid_twice) <= 8
    assert api.billed == 100 + len(paid_twice)
    stored = [p for p in s3_server.object_path(bucket, "").iterdir() if p.suffix == ".png"]
    assert len(stored) == 100  # the images in flight at the kill were never persisted


@pytest.mark.scenario
def test_two_runs_at_once_pay_once(
    tmp_path: Path, api: GptImageEmulator, s3_server: LocalS3Server, user_env: dict[str, str]
) -> None:
    prompts = [f"a twin tern #{n}" for n in range(12)]
    _, args = cli_run(s3_server, tmp_path, prompts)
    api.latency = 0.5

    runs = [
        subprocess.Popen(
            [*args, "--prefix", prefix],
            env=user_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for prefix in ("first", "second")
    ]
    outputs = [run.communicate(timeout=300) for run in runs]

    assert [run.returncode for run in runs] == [0, 0], "\n".join(out for out, _ in outputs)
    assert api.billed == 12
    assert all(api.billed_for(p) == 1 for p in prompts)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/image.png",
        "http://192.168.0.10/image.png",
        "http://127.0.0.1:8080/image.png",
        "http://[::1]/image.png",
        "http://[::ffff:127.0.0.1]/image.png",
        "http://localhost/image.png",
        "http://0.0.0.0/image.png",
    ],
)
def test_image_urls_into_the_local_network_are_refused(url: str) -> None:
    with pytest.raises(UnsafeImageURLError, match="internal address"):
        check_image_url(url, allow_internal=False)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://cdn/x.png", "gopher://x", "//x"])
def test_image_urls_must_be_http(url: str) -> None:
    with pytest.raises(UnsafeImageURLError, match="not an http"):
        check_image_url(url, allow_internal=True)


def test_public_image_urls_pass() -> None:
    check_image_url("https://93.184.215.14/image.png", allow_internal=False)


def test_client_refuses_an_internal_image_url_from_a_public_api(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    client = RapidAPIClient(credentials, allow_internal_images=False)
    with pytest.raises(UnsafeImageURLError):
        client.generate(ImageRequest(prompt="a metadata-hungry mole"))
    assert api.image_downloads == 0


def test_invalid_bucket_name_is_refused_before_any_paid_call(
    api: GptImageEmulator, credentials: RapidAPICredentials, s3_server: LocalS3Server
) -> None:
    from prefect_gpt_image.errors import InvalidRequestError

    bad = S3Bucket(bucket_name="Not_A_Bucket", credentials=s3_server.aws_credentials())
    with pytest.raises(InvalidRequestError, match="not a valid S3 bucket name"):
        generate_images(["a bucketless bee"], bucket=bad, credentials=credentials)
    assert api.calls == []


def test_redirects_are_followed_and_every_hop_is_checked(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    client = RapidAPIClient(credentials)
    first = client.generate(ImageRequest(prompt="a redirected wren"))
    assert first.source_url
    api.add_fault(Fault.redirected_url(first.source_url))
    via_redirect = client.generate(ImageRequest(prompt="a redirected wren"))
    assert via_redirect.data == first.data

    api.add_fault(Fault.redirected_url("file:///etc/passwd"))
    with pytest.raises(UnsafeImageURLError, match="not an http"):
        client.generate(ImageRequest(prompt="a trapped wren"))
