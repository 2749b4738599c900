"""The credentials block as Prefect users meet it: in the UI, saved, loaded by name."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from prefect.utilities.dispatch import lookup_type
from prefect_aws import S3Bucket
from pydantic import SecretStr

import prefect_gpt_image
from prefect_gpt_image import OpenAICredentials, RapidAPICredentials, generate_images
from prefect_gpt_image.errors import ConfigurationError
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server


@pytest.mark.parametrize(
    ("block", "name", "slug"),
    [
        (RapidAPICredentials, "RapidAPI Credentials", "rapidapi-credentials"),
        (OpenAICredentials, "OpenAI Image Credentials", "openai-image-credentials"),
    ],
)
def test_block_metadata_for_the_ui(block: type[Block], name: str, slug: str) -> None:
    assert block.get_block_type_name() == name
    assert block.get_block_type_slug() == slug
    assert block.get_description()
    assert str(block._documentation_url).startswith("https://")
    assert f'{block.__name__}.load("BLOCK_NAME")' in (block.get_code_example() or "")
    for field_name, field in block.model_fields.items():
        assert field.description and field.description.endswith("."), field_name
    schema = block.model_json_schema()
    assert schema["required"] == ["api_key"]
    assert schema["properties"]["api_key"]["format"] == "password"


def test_openai_defaults_reach_openai() -> None:
    creds = OpenAICredentials(api_key=SecretStr("k"))
    assert creds.endpoint_url == "https://api.openai.com/v1/images/generations"
    assert (creds.model, creds.auth_header) == ("gpt-image-2", "authorization")
    azure = OpenAICredentials(
        api_key=SecretStr("k"),
        base_url="https://r.openai.azure.com/openai/v1/",
        auth_header="api-key",
    )
    assert azure.endpoint_url == "https://r.openai.azure.com/openai/v1/images/generations"
    assert azure.route_name == "r.openai.azure.com"


def test_defaults_name_todays_endpoint() -> None:
    creds = RapidAPICredentials(api_key=SecretStr("k"))
    assert creds.endpoint_url == "https://gpt-image-1-5.p.rapidapi.com/generate"
    assert (creds.model, creds.price_per_image_usd) == ("gpt-image-1.5", 0.03)
    assert creds.timeout_seconds >= 120  # high-quality generations take over a minute
    moved = RapidAPICredentials(
        api_key=SecretStr("k"), api_host="gpt-image-2.p.rapidapi.com", path="v2/images"
    )
    assert moved.endpoint_url == "https://gpt-image-2.p.rapidapi.com/v2/images"


def test_saved_blocks_are_used_by_name(
    api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
    s3_server: LocalS3Server,
) -> None:
    credentials.save("test-credentials", overwrite=True)
    bucket.save("test-bucket", overwrite=True)

    report = generate_images(
        ["a saved swallow"], bucket="test-bucket", credentials="test-credentials"
    )

    (image,) = report.images
    assert (
        s3_server.object_path(bucket.bucket_name, image.key).read_bytes()
        == api.served[image.sha256]
    )
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(
            "test-credentials", "rapidapi-credentials", include_secrets=False
        )
    assert credentials.api_key.get_secret_value() not in str(document.data)


def test_unknown_block_name_says_what_to_do(bucket: S3Bucket) -> None:
    with pytest.raises(
        ConfigurationError,
        match="No saved RapidAPICredentials or OpenAICredentials block named 'nope'",
    ):
        generate_images(["x"], bucket=bucket, credentials="nope")


def test_no_key_anywhere_says_what_to_do(bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAPIDAPI_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="set the RAPIDAPI_KEY environment variable"):
        generate_images(["x"], bucket=bucket)


def test_collection_entry_point_makes_the_block_known_to_prefect() -> None:
    (entry,) = [
        e for e in entry_points(group="prefect.collections") if e.name == "prefect_gpt_image"
    ]
    entry.load()
    assert lookup_type(Block, "rapidapi-credentials") is RapidAPICredentials


def test_prefect_block_register(tmp_path: Path) -> None:
    prefect = str(Path(sys.executable).parent / "prefect")
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    result = subprocess.run(
        [prefect, "block", "register", "-m", "prefect_gpt_image"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RapidAPI Credentials" in result.stdout
    assert "OpenAI Image Credentials" in result.stdout
    with get_client(sync_client=True) as client:
        block_type = client.read_block_type_by_slug("rapidapi-credentials")
    assert block_type.name == "RapidAPI Credentials"


class TestCredentialsBlocksMeetPrefectsStandard(BlockStandardTestSuite):
    @pytest.fixture(params=[RapidAPICredentials, OpenAICredentials])
    def block(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type[Block]:
        # The suite downloads the logo from `_logo_url`; the logo ships in the package, and
        # is checked here from the installed copy.
        logo = Path(prefect_gpt_image.__file__).parent / "assets" / "logo.png"
        monkeypatch.setattr(request.param, "_logo_url", logo.as_uri())
        return request.param  # type: ignore[no-any-return]
