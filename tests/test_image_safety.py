"""What an answer can make this machine fetch, and what an answered image can make it do.

Image URLs and images come from the API, so they are untrusted: a URL may lead to this
network's own services (directly, by redirect, or by a host name that answers differently
the second time it is looked up), and an image may be no image at all, a decompression
bomb, or something that quotes a secret back into error messages. The API is the emulator
where it can give the answer, and a scripted loopback server (`StandIn`) where a test needs
an answer of its own; the same class plays the image hosts and internal services answers
point at, and records every request they receive.
"""

from __future__ import annotations

import base64
import datetime
import io
import ipaddress
import json
import socket
import ssl
import struct
import threading
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect_aws import S3Bucket

from prefect_gpt_image import ImageRequest, RapidAPICredentials, generate_images
from prefect_gpt_image import _client as client_module
from prefect_gpt_image._client import RapidAPIClient
from prefect_gpt_image._images import MAX_IMAGE_PIXELS, inspect_image
from prefect_gpt_image._retry_policy import DOWNLOAD_ATTEMPTS, is_retryable
from prefect_gpt_image._url_safety import check_image_url
from prefect_gpt_image.errors import (
    GptImageError,
    InvalidImageError,
    InvalidResponseError,
    RunFailedError,
    UnsafeImageURLError,
)
from prefect_gpt_image.testing import Fault, GptImageEmulator, LocalS3Server

SECRET = b"AWS_SECRET=abcd1234efgh5678"
"""A body an internal service might answer: no error message may ever quote it."""

PUBLIC_ADDRESS = "93.184.215.14"


def png(width: int = 32, height: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int, pixel_data: bytes = b"") -> bytes:
    """A PNG whose header says `width` x `height` (8-bit greyscale), with `pixel_data`
    compressed as its only IDAT chunk, and every chunk's checksum right."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(pixel_data, 9))
        + chunk(b"IEND", b"")
    )


# --- Real servers on loopback ------------------------------------------------------------


class StandIn(ThreadingHTTPServer):
    """A loopback HTTP(S) server answering as scripted, recording every request: an API
    with an answer the emulator cannot give, an image host, an internal service."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None):
        super().__init__((host, port), _StandInHandler)
        self.scheme = "https" if tls else "http"
        self.replies: dict[tuple[str, str], tuple[int, str, bytes]] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.server_names: list[str | None] = []
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.server_address[0]}:{self.port}"

    def reply(
        self, method: str, path: str, body: bytes, content_type: str, status: int = 200
    ) -> None:
        self.replies[(method, path)] = (status, content_type, body)

    def answer_with(self, payload: Any) -> None:
        """Answer every generation request with `payload` as JSON (bytes: as they are)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.reply("POST", "*", body, "application/json")

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _StandInHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: StandIn

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer()

    def _answer(self) -> None:
        self.server.requests.append((self.command, self.path, self.headers.get("Host")))
        replies = self.server.replies
        status, content_type, body = replies.get(
            (self.command, self.path), replies.get((self.command, "*"), (404, "text/plain", b""))
        )
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def internal_service() -> Iterator[StandIn]:
    """A service inside this network, on loopback at a port that is not the API's: it
    answers a secret to anyone who asks, labelled as an image."""
    server = StandIn()
    server.reply("GET", "*", SECRET, "image/png")
    yield server
    server.close()


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.close()


def stand_in_credentials(server: StandIn, **changes: Any) -> RapidAPICredentials:
    return RapidAPICredentials(
        api_key="stand-in-key",
        base_url=server.url,
        model=f"gpt-image-test-{uuid.uuid4().hex[:8]}",
        timeout_seconds=5,
    ).model_copy(update=changes)


def serve_image(server: StandIn, data: bytes, content_type: str = "image/png") -> None:
    """`server` answers a generation with a URL on itself, where it serves `data`."""
    server.answer_with({"url": f"{server.url}/images/generated.png"})
    server.reply("GET", "/images/generated.png", data, content_type)


class Resolver:
    """The host names a test controls, answered in turn (the last answer repeats); every
    other name goes to the system's resolver.

    It stands in for a DNS server, which cannot run here: `socket.getaddrinfo` is what
    both this package and httpx's connections ask, as they would ask a real DNS server.
    """

    def __init__(self, system: Any) -> None:
        self._system = system
        self.answers: dict[str, list[str | OSError]] = {}
        self.asked: Counter[str] = Counter()

    def answer(self, name: str, *answers: str | OSError) -> None:
        self.answers[name] = list(answers)

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return self._system(host, port, *args, **kwargs)
        self.asked[name] += 1
        answers = self.answers[name]
        answer = answers[min(self.asked[name], len(answers)) - 1]
        if isinstance(answer, OSError):
            raise answer
        number = int(port or 0)
        if ipaddress.ip_address(answer).version == 6:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (answer, number, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, number))]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    resolver = Resolver(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    return resolver


def generate(credentials: RapidAPICredentials, **options: Any) -> Any:
    """One generation through the client the task uses; the error it raised, or the image."""
    try:
        return RapidAPIClient(credentials, **options).generate(
            ImageRequest(prompt=f"an untrusted urchin {uuid.uuid4().hex[:6]}")
        )
    except GptImageError as exc:
        return exc


def assert_quotes_nothing(error: BaseException) -> None:
    text = str(error)
    assert "AWS_SECRET" not in text and "abcd1234" not in text, text
    assert "b'" not in text, text


# --- 1. DNS rebinding: a name is looked up once, and fetched from that address ---------------


def test_a_name_that_rebinds_to_loopback_is_never_fetched_from_loopback(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    internal_service: StandIn,
    dns: Resolver,
) -> None:
    name = "images.rebind.test"
    dns.answer(name, PUBLIC_ADDRESS, "127.0.0.1")
    api.add_fault(Fault.redirected_url(f"http://{name}:{internal_service.port}/cat.png"))

    # A one-second timeout bounds the attempt on the public address, which has no server.
    error = generate(credentials.model_copy(update={"timeout_seconds": 1}))

    assert internal_service.requests == []
    # The first attempt went to the address its check saw; the second looked the name up
    # again, saw loopback, and refused. Each attempt looked the name up once.
    assert isinstance(error, UnsafeImageURLError), error
    assert "internal address (127.0.0.1)" in str(error)
    assert dns.asked[name] == 2
    assert error.billed


def test_a_download_connects_to_the_checked_address_and_names_the_host(
    api: GptImageEmulator, credentials: RapidAPICredentials, dns: Resolver
) -> None:
    image_host = StandIn("127.0.0.2")
    other = StandIn("127.0.0.1", image_host.port)  # what the name answers the second time
    image_host.reply("GET", "/cat.png", png(), "image/png")
    other.reply("GET", "*", SECRET, "image/png")
    name = "cdn.pinned.test"
    dns.answer(name, "127.0.0.2", "127.0.0.1")
    api.add_fault(Fault.redirected_url(f"http://{name}:{image_host.port}/cat.png"))
    try:
        image = generate(credentials, allow_internal_images=True)
    finally:
        image_host.close()
        other.close()

    assert not isinstance(image, Exception), image
    assert image.data == png()
    assert image_host.requests == [("GET", "/cat.png", f"{name}:{image_host.port}")]
    assert other.requests == []
    assert dns.asked[name] == 1


class LocalCA:
    """A certificate authority of this test's own, and certificates it signs."""

    def __init__(self, folder: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._serialization, self._ec = x509, hashes, serialization, ec
        self._name_oid = NameOID
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prefect-gpt-image test CA")])
        self.cert = (
            self._builder(name, name, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: Any, issuer: Any, public_key: Any) -> Any:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            self._x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(self._x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )

    def server_context(self, host_name: str) -> ssl.SSLContext:
        """A server's TLS context with a certificate for `host_name` signed by this CA."""
        x509, serialization = self._x509, self._serialization
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(self._name_oid.COMMON_NAME, host_name)])
        cert = (
            self._builder(subject, self.cert.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host_name)]), critical=False)
            .sign(self.key, self._hashes.SHA256())
        )
        cert_path = self.folder / f"{host_name}.pem"
        cert_path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path)
        return context


@pytest.fixture
def trusted_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCA]:
    """A CA the download client trusts, as a user trusts one: SSL_CERT_FILE (the pool is
    rebuilt to read it, and closed afterwards)."""
    ca = LocalCA(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.path))
    client_module.download_http_client.cache_clear()
    yield ca
    client_module.download_http_client().close()
    client_module.download_http_client.cache_clear()


@pytest.mark.parametrize("certified", ["cdn.pinned.test", "elsewhere.test"])
def test_https_images_are_fetched_from_the_checked_address_under_their_host_name(
    certified: str,
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    dns: Resolver,
    trusted_ca: LocalCA,
) -> None:
    """The connection goes to the address, the TLS server name (SNI) and the Host header
    name the host, and the certificate must be the host's."""
    name = "cdn.pinned.test"
    image_host = StandIn(tls=trusted_ca.server_context(certified))
    image_host.reply("GET", "/cat.png", png(), "image/png")
    dns.answer(name, "127.0.0.1")
    api.add_fault(Fault.redirected_url(f"https://{name}:{image_host.port}/cat.png"))
    try:
        result = generate(credentials, allow_internal_images=True)
    finally:
        image_host.close()

    assert set(image_host.server_names) == {name}
    assert dns.asked[name] == (1 if certified == name else DOWNLOAD_ATTEMPTS)
    if certified == name:
        assert not isinstance(result, Exception), result
        assert result.data == png()
        assert image_host.requests == [("GET", "/cat.png", f"{name}:{image_host.port}")]
    else:
        assert isinstance(result, InvalidResponseError)
        assert "certificate" in str(result).lower()
        assert image_host.requests == []


# --- 2. A host name that cannot be looked up is not fetched --------------------------------


def test_a_failed_lookup_is_retried_and_never_fetched_unchecked(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    internal_service: StandIn,
    dns: Resolver,
) -> None:
    name = "flaky.dns.test"
    dns.answer(
        name, socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), "127.0.0.1"
    )
    api.add_fault(Fault.redirected_url(f"http://{name}:{internal_service.port}/cat.png"))

    error = generate(credentials)

    assert internal_service.requests == []
    assert isinstance(error, UnsafeImageURLError), error  # the retry's lookup was checked
    assert dns.asked[name] == 2


def test_a_host_that_never_resolves_fails_as_a_retryable_download(
    api: GptImageEmulator, credentials: RapidAPICredentials, dns: Resolver
) -> None:
    name = "gone.dns.test"
    dns.answer(name, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    api.add_fault(Fault.redirected_url(f"http://{name}/cat.png"))

    error = generate(credentials)

    assert isinstance(error, InvalidResponseError), error
    assert "could not be looked up" in str(error)
    assert f"after {DOWNLOAD_ATTEMPTS} attempts" in str(error)
    assert is_retryable(error) and error.billed
    assert dns.asked[name] == DOWNLOAD_ATTEMPTS


# --- 3. An API at an internal address opens its own host and port, nothing else -----------


def test_an_internal_api_allows_images_from_its_own_host_and_port_only(
    api: GptImageEmulator, credentials: RapidAPICredentials, internal_service: StandIn
) -> None:
    served = generate(credentials)  # the emulator's own images: its host and port
    assert not isinstance(served, Exception), served

    api.add_fault(Fault.redirected_url(f"{internal_service.url}/cat.png"))
    error = generate(credentials)

    assert isinstance(error, UnsafeImageURLError), error
    assert "internal address (127.0.0.1)" in str(error)
    assert internal_service.requests == []
    assert not is_retryable(error)


def test_the_opt_in_allows_other_internal_addresses(
    api: GptImageEmulator, credentials: RapidAPICredentials, stand_in: StandIn
) -> None:
    stand_in.reply("GET", "/cat.png", png(), "image/png")
    api.add_fault(Fault.redirected_url(f"{stand_in.url}/cat.png"))

    image = generate(credentials, allow_internal_images=True)

    assert not isinstance(image, Exception), image
    assert image.data == png()


@pytest.mark.parametrize(
    "location",
    ["http://169.254.169.254/latest/meta-data/", "http://metadata.cloud.test/latest/meta-data/"],
)
def test_cloud_metadata_is_never_fetched_even_with_the_opt_in(
    location: str, api: GptImageEmulator, credentials: RapidAPICredentials, dns: Resolver
) -> None:
    dns.answer("metadata.cloud.test", "169.254.169.254")
    api.add_fault(Fault.redirected_url(location))

    # One second bounds a connection attempt, should one be made.
    error = generate(
        credentials.model_copy(update={"timeout_seconds": 1}), allow_internal_images=True
    )

    assert isinstance(error, UnsafeImageURLError), error
    assert "169.254.169.254, cloud metadata" in str(error)


@pytest.mark.parametrize(
    "url",
    [
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[fe80::a9fe:a9fe]/",
        "http://169.254.0.1/",
    ],
)
def test_every_cloud_metadata_address_is_refused_even_with_the_opt_in(url: str) -> None:
    with pytest.raises(UnsafeImageURLError, match="cloud metadata"):
        check_image_url(url, allow_internal=True)


# --- 4. IPv6 addresses that carry an IPv4 one are judged by it ----------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b::7f00:1]/x.png",  # NAT64 of 127.0.0.1
        "http://[64:ff9b::a00:1]/x.png",  # NAT64 of 10.0.0.1
        "http://[2002:7f00:1::1]/x.png",  # 6to4 of 127.0.0.1
        "http://[2002:c0a8:1::]/x.png",  # 6to4 of 192.168.0.1
        "http://[::7f00:1]/x.png",  # IPv4-compatible 127.0.0.1
        "http://[::a00:1]/x.png",  # IPv4-compatible 10.0.0.1
        "http://[::ffff:10.0.0.1]/x.png",  # IPv4-mapped
    ],
)
def test_ipv6_forms_of_internal_ipv4_addresses_are_refused(url: str) -> None:
    with pytest.raises(UnsafeImageURLError, match="internal address"):
        check_image_url(url, allow_internal=False)


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
        "http://[2002:a9fe:a9fe::]/",  # 6to4 of 169.254.169.254
        "http://[::a9fe:a9fe]/",  # IPv4-compatible
        "http://[::ffff:169.254.169.254]/",  # IPv4-mapped
    ],
)
def test_ipv6_forms_of_the_metadata_address_are_refused_even_with_the_opt_in(url: str) -> None:
    with pytest.raises(UnsafeImageURLError, match="cloud metadata"):
        check_image_url(url, allow_internal=True)


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b::808:808]/x.png",  # NAT64 of 8.8.8.8, as DNS64 answers it
        "http://[2002:808:808::1]/x.png",
        "http://[::ffff:8.8.8.8]/x.png",
    ],
)
def test_ipv6_forms_of_public_ipv4_addresses_pass(url: str) -> None:
    pinned = check_image_url(url, allow_internal=False)
    assert pinned.address == ipaddress.ip_address(url[len("http://[") :].split("]")[0])


# --- 5. Errors say what a body was, never what it held --------------------------------------


def test_a_body_that_is_not_an_image_is_described_not_quoted(stand_in: StandIn) -> None:
    serve_image(stand_in, SECRET, "image/png; charset=binary")

    error = generate(stand_in_credentials(stand_in))

    assert isinstance(error, InvalidImageError), error
    assert f"served {len(SECRET)} bytes labelled image/png that are not a readable image" in str(
        error
    )
    assert_quotes_nothing(error)


def test_an_inline_image_that_is_not_an_image_is_described_not_quoted(stand_in: StandIn) -> None:
    stand_in.answer_with({"data": [{"b64_json": base64.b64encode(SECRET).decode()}]})

    error = generate(stand_in_credentials(stand_in))

    assert isinstance(error, InvalidImageError), error
    assert f"{len(SECRET)} bytes that are not a readable image" in str(error)
    assert_quotes_nothing(error)


def test_an_answer_with_no_image_shows_its_fields_not_their_values(stand_in: StandIn) -> None:
    stand_in.answer_with({"status": SECRET.decode(), "result": {"images": [], "seed": 7}})

    error = generate(stand_in_credentials(stand_in))

    assert isinstance(error, InvalidResponseError), error
    assert str(error) == (
        "The API answered 200 but with no image in it: "
        '{"status": string, "result": {"images": [], "seed": number}}'
    )
    assert error.billed


def test_an_answer_that_is_not_json_is_described_not_quoted(stand_in: StandIn) -> None:
    stand_in.answer_with(SECRET)

    error = generate(stand_in_credentials(stand_in))

    assert isinstance(error, InvalidResponseError), error
    assert str(error) == (
        f"The API answered 200 with a body that is not JSON ({len(SECRET)} bytes, text)."
    )


def test_a_broken_image_leaves_no_bytes_in_the_report_manifest_or_run_page(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    """The emulator's broken CDN serves an HTML page labelled image/png."""
    api.add_fault(Fault.not_an_image(), prompt_contains="broken")
    state = generate_images(
        ["a broken badger", "a fine ferret"],
        bucket=bucket,
        credentials=credentials,
        return_state=True,
    )

    failed = state.result(raise_on_failure=False)
    assert isinstance(failed, RunFailedError)
    (failure,) = failed.report.failures
    assert "labelled image/png that are not a readable image" in failure.error
    assert failed.report.manifest_key
    manifest = (
        s3_server.boto3_client()
        .get_object(Bucket=bucket.bucket_name, Key=failed.report.manifest_key)["Body"]
        .read()
        .decode()
    )
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    page = json.dumps([artifact.model_dump(mode="json") for artifact in artifacts])
    assert "not a readable image" in manifest and "not a readable image" in page
    for where in (failure.error, str(failed), manifest, page):
        assert "<html" not in where and "Service temporarily" not in where


# --- 6. The cap applies before an inline image is decoded ---------------------------------


def test_an_inline_image_over_the_cap_is_refused_by_its_size_without_decoding_it(
    stand_in: StandIn,
) -> None:
    # 8 MB of base64 for a 1 MB cap, and not base64 at all past its first 6 MB: the size
    # alone refuses it, so the text is never decoded (a decode would fail on it).
    text = "A" * 6_000_000 + "@" * 2_000_000
    stand_in.answer_with({"data": [{"b64_json": text}]})

    error = generate(stand_in_credentials(stand_in, max_image_bytes=1_000_000))

    assert isinstance(error, InvalidImageError), error
    assert "larger (6,000,000 bytes) than max_image_bytes (1,000,000)" in str(error)
    assert error.billed


def test_an_inline_image_within_the_cap_is_decoded(stand_in: StandIn) -> None:
    data = png(64, 48)
    stand_in.answer_with({"data": [{"b64_json": base64.b64encode(data).decode()}]})

    image = generate(stand_in_credentials(stand_in, max_image_bytes=len(data)))

    assert not isinstance(image, Exception), image
    assert (image.data, image.width, image.height) == (data, 64, 48)


# --- 7. Every image is decoded in full, within a pixel limit -------------------------------


def test_a_tiny_png_claiming_a_huge_picture_is_refused_undecoded(stand_in: StandIn) -> None:
    bomb = png_claiming(12_000, 12_000)
    assert len(bomb) < 100
    serve_image(stand_in, bomb)

    error = generate(stand_in_credentials(stand_in))

    assert isinstance(error, InvalidImageError), error
    assert "12000x12000 pixels" in str(error)
    assert f"more than the {MAX_IMAGE_PIXELS:,} accepted" in str(error)
    assert MAX_IMAGE_PIXELS == 3840 * 2160 * 3 // 2


def test_a_png_beyond_pillows_own_limit_fails_as_a_product_error(stand_in: StandIn) -> None:
    serve_image(stand_in, png_claiming(20_000, 20_000))  # Pillow refuses to open it at all

    error = generate(stand_in_credentials(stand_in))

    assert isinstance(error, InvalidImageError), error
    assert "refused without decoding it" in str(error)


def test_an_image_whose_pixels_are_missing_is_refused(stand_in: StandIn) -> None:
    # Headers and checksums are all right; the compressed pixels stop after 100 bytes.
    serve_image(stand_in, png_claiming(64, 64, b"\0" * 100))

    error = generate(stand_in_credentials(stand_in))

    assert isinstance(error, InvalidImageError), error
    assert "not a readable image" in str(error)
    assert_quotes_nothing(error)


@pytest.mark.parametrize(
    ("pixel_data", "reason"),
    [
        (b"\0" * (65 * 64 - 1), "it is truncated"),
        (b"\0" * (65 * 64 + 1), "it holds more pixel data than its size says"),
        (b"\x05" + b"\0" * (65 * 64 - 1), "a row of its pixel data has an unknown filter"),
    ],
)
def test_a_png_whose_pixel_data_is_not_its_size_is_refused(pixel_data: bytes, reason: str) -> None:
    # 64x64 greyscale: 64 rows of a filter byte and 64 samples, checksums all right.
    with pytest.raises(InvalidImageError) as refused:
        inspect_image(png_claiming(64, 64, pixel_data), "image/png")

    assert str(refused.value).endswith(f"not a readable image: {reason}.")


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_every_kind_of_well_formed_png_is_accepted(mode: str) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (33, 7)).save(buffer, "PNG")

    info = inspect_image(buffer.getvalue())

    assert (info.media_type, info.width, info.height) == ("image/png", 33, 7)


# --- 8. Whatever an answer holds, the error is the product's -------------------------------


def test_a_host_label_too_long_to_look_up_is_an_invalid_response(
    api: GptImageEmulator, credentials: RapidAPICredentials
) -> None:
    api.add_fault(Fault.redirected_url(f"http://{'a' * 64}.example/cat.png"))

    error = generate(credentials)

    assert isinstance(error, InvalidResponseError), error
    assert "cannot be looked up" in str(error)
    assert error.billed


def test_json_nested_too_deep_is_an_invalid_response(stand_in: StandIn) -> None:
    stand_in.answer_with(b"[" * 200_000 + b"]" * 200_000)

    error = generate(stand_in_credentials(stand_in))

    assert isinstance(error, InvalidResponseError), error
    assert str(error) == "The API answered 200 with JSON nested too deep to read (400,000 bytes)."
    assert error.billed


def test_numbers_json_cannot_hold_do_not_break_an_answer(stand_in: StandIn) -> None:
    data = png()
    usage = (
        '{"input_tokens": Infinity, "output_tokens": 1e999, '
        '"input_tokens_details": {"text_tokens": NaN}}'
    )
    inline = base64.b64encode(data).decode()
    body = f'{{"data": [{{"b64_json": "{inline}"}}], "usage": {usage}}}'
    stand_in.answer_with(body.encode())

    image = generate(stand_in_credentials(stand_in))

    assert not isinstance(image, Exception), image
    assert image.data == data
