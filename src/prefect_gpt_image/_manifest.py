"""The manifest: one JSON line per prompt, beside the run's images."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from functools import partial
from typing import Any

from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect_aws import S3Bucket

from prefect_gpt_image._object_keys import manifest_key, s3_uri
from prefect_gpt_image._retry_policy import call_with_retries
from prefect_gpt_image._storage import object_uri, put_bytes, read_uri
from prefect_gpt_image.errors import StorageError
from prefect_gpt_image.models import RunReport


def write_manifest(
    bucket: S3Bucket,
    folder: str,
    report: RunReport,
    rows: list[dict[str, Any]],
    *,
    key: str | None = None,
) -> None:
    """Write the manifest beside the images (at `key`, to replace one written before), and
    say where in `report`; if S3 refuses it now, write a local copy instead, so the report
    and the artifacts still come out."""
    key = key or manifest_key(bucket.bucket_folder, folder, _run_label())
    manifest = _lines(rows)
    try:
        put_bytes(bucket, key, manifest, "application/x-ndjson")
    except StorageError as exc:
        local = get_current_settings().home / "manifests" / key.rsplit("/", 1)[-1]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(manifest)
        get_run_logger().error(
            "Could not write the manifest to %s (%s); it is at %s",
            object_uri(bucket, key),
            exc,
            local,
        )
        report.manifest_key, report.manifest_uri = None, local.as_uri()
        return
    report.manifest_key, report.manifest_uri = key, object_uri(bucket, key)


def put_manifest(bucket: S3Bucket, key: str, rows: list[dict[str, Any]]) -> None:
    """Replace the manifest at `key` with `rows`."""
    call_with_retries(partial(put_bytes, bucket, key, _lines(rows), "application/x-ndjson"))


def read_manifest(bucket: S3Bucket, key: str) -> list[dict[str, Any]]:
    """The lines of the manifest at `key`."""
    data = call_with_retries(partial(read_uri, bucket, s3_uri(bucket.bucket_name, key)))
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def _lines(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def _run_label() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{flow_run.name or 'local'}"
