"""What a run shows on its page in Prefect: progress while it runs, then a table of every
prompt and a gallery of the images."""

from __future__ import annotations

import html
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
)
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import ArtifactUpdate

from prefect_gpt_image.models import RunReport, StoredImage

logger = logging.getLogger(__name__)

TABLE_KEY = "gpt-image-run"
GALLERY_KEY = "gpt-image-gallery"
PUBLISHED_KEY = "gpt-image-published"
GALLERY_MAX_IMAGES = 60
THUMBNAIL_WIDTH = 200
THUMBNAIL_HEIGHT = 120
"""With placements, every thumbnail of a concept is this tall, so their shapes compare..."""
THUMBNAIL_MAX_WIDTH = 480
"""...but for the widest (a 728x90 banner), which is this wide instead."""
PROGRESS_INTERVAL_SECONDS = 2.0
"""Progress is published at most this often, from a thread of its own: a busy Prefect
server can take seconds to answer, and the run must not wait for it."""

Link = Callable[[str], str]
"""The URL a person can open for an object key: presigned, or under a public base URL."""


class ProgressArtifact:
    """A progress artifact, published in the background as the run advances."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._done = 0
        self._published = -1
        self._changed = threading.Event()
        self._closed = threading.Event()
        artifact_id = create_progress_artifact(
            progress=0.0, description=f"Images generated and stored, of {total}."
        )
        assert isinstance(artifact_id, UUID)  # from sync code, the id itself
        self._artifact_id = artifact_id
        self._thread = threading.Thread(target=self._publish_loop, daemon=True)
        self._thread.start()

    def update(self, done: int) -> None:
        self._done = done
        self._changed.set()

    def close(self) -> None:
        self._closed.set()
        self._changed.set()
        self._thread.join()

    def _publish_loop(self) -> None:
        # One client for the run: Prefect's `update_progress_artifact` opens a new one,
        # TLS context and all, for every update.
        with get_client(sync_client=True) as client:
            while not self._closed.is_set():
                self._changed.wait()
                self._publish(client)
                self._closed.wait(PROGRESS_INTERVAL_SECONDS)
            self._publish(client)

    def _publish(self, client: SyncPrefectClient) -> None:
        self._changed.clear()
        done = self._done
        if done == self._published:
            return
        try:
            progress = ArtifactUpdate(data=100.0 * done / self._total)
            client.update_artifact(artifact_id=self._artifact_id, artifact=progress)
            self._published = done
        except Exception:  # progress is a courtesy: never fail a run over it
            logger.warning("Could not update the progress artifact", exc_info=True)


def publish_results(
    rows: Sequence[dict[str, Any]],
    report: RunReport,
    link: Link,
    safe_zones: Mapping[str, str] | None = None,
    *,
    review: bool = False,
) -> None:
    """The table of every prompt (with an edit's inputs, where there are edits, and each
    rendition's placement, where there are placements), and the gallery of the stored
    images: with `review`, each concept captioned with the name a reviewer decides on."""
    edits = any(row.get("inputs") for row in rows)
    placements = any(row.get("placement") for row in rows)
    create_table_artifact(
        key=TABLE_KEY,
        table=[_table_row(row, link, edits, placements) for row in rows],
        description=report.summary(),
    )
    markdown = gallery(report, link, safe_zones, review=review)
    create_markdown_artifact(key=GALLERY_KEY, markdown=markdown)


def publish_published(published: Sequence[StoredImage], link: Link) -> None:
    """The `published` artifact: every object a review published, with a link to each."""
    lines = [f"## {len(published)} object(s) published", ""]
    if published:
        lines += ["| object | placement | link |", "| --- | --- | --- |"]
        lines += [
            f"| `{image.uri}` | {image.placement or 'master'} | [open]({link(image.key)}) |"
            for image in published
        ]
    create_markdown_artifact(key=PUBLISHED_KEY, markdown="\n".join(lines))


def _table_row(row: dict[str, Any], link: Link, edits: bool, placements: bool) -> dict[str, Any]:
    inputs = {"inputs": _inputs(row.get("inputs") or [])} if edits else {}
    placement = {"placement": row.get("placement") or ""} if placements else {}
    return {
        "prompt": row["prompt"],
        **placement,
        **inputs,
        "status": row["status"],
        "object": row.get("uri", ""),
        "link": link(row["key"]) if row.get("key") else "",
        "size": row.get("size", ""),
        "route": row.get("route", ""),
        "model": row.get("model", ""),
        "cost_usd": row.get("cost_usd", 0.0),
        "cached": row.get("cached", False),
        "error": row.get("error", ""),
    }


def _inputs(inputs: Sequence[dict[str, Any]]) -> str:
    return "; ".join(f"{image['uri']} sha256:{image['sha256']}" for image in inputs)


def gallery(
    report: RunReport,
    link: Link,
    safe_zones: Mapping[str, str] | None = None,
    *,
    review: bool = False,
) -> str:
    """Thumbnails of the stored images, each linking to the full image; with placements,
    one row per concept: its master, then its renditions side by side at their shapes,
    each captioned with its placement, its pixels and any safe zone (`safe_zones`, by
    placement name).

    HTML, because markdown cannot size an image: the UI would show each at full width.
    """
    images = list({image.key: image for image in report.images}.values())
    lines = [f"## {report.summary()}", ""]
    if not images:
        return "\n".join([*lines, "No image was stored."])
    shown = images[:GALLERY_MAX_IMAGES]
    by_concept = review or any(image.is_rendition for image in shown)
    if not by_concept:
        lines.append(" ".join(_thumbnail(image, link, width=THUMBNAIL_WIDTH) for image in shown))
    for concept in _concepts(shown) if by_concept else []:
        master = concept[0]
        lines += ["", f"**{html.escape(' '.join(master.title.split())[:120])}**", ""]
        if review:
            lines += [f"`{master.file_name}`", ""]
        zones = safe_zones or {}
        lines.append(
            " ".join(
                _thumbnail(image, link, width=_at_one_height(image), zones=zones)
                for image in concept
            )
        )
        lines += ["", " · ".join(html.escape(_caption(image, zones)) for image in concept)]
    if len(images) > GALLERY_MAX_IMAGES:
        lines += ["", f"... and {len(images) - GALLERY_MAX_IMAGES} more, listed in the table."]
    return "\n".join(lines)


def _concepts(images: Sequence[StoredImage]) -> list[list[StoredImage]]:
    """Each master with the renditions that follow it."""
    concepts: list[list[StoredImage]] = []
    for image in images:
        if image.is_rendition and concepts:
            concepts[-1].append(image)
        else:
            concepts.append([image])
    return concepts


def _thumbnail(
    image: StoredImage,
    link: Link,
    *,
    width: int,
    zones: Mapping[str, str] | None = None,
) -> str:
    """A linked thumbnail `width` pixels wide (the UI sizes images by their width), titled
    with its concept, or, with placements (`zones` given), its placement."""
    url = html.escape(link(image.key))
    caption = html.escape(_caption(image, zones) if zones is not None else _title(image))
    return (
        f'<a href="{url}"><img src="{url}" width="{width}" alt="{caption}" title="{caption}"></a>'
    )


def _at_one_height(image: StoredImage) -> int:
    """The width that shows `image` `THUMBNAIL_HEIGHT` tall, within `THUMBNAIL_MAX_WIDTH`."""
    return min(round(THUMBNAIL_HEIGHT * image.width / max(image.height, 1)), THUMBNAIL_MAX_WIDTH)


def _title(image: StoredImage) -> str:
    return " ".join(image.title.split())[:120]


def _caption(image: StoredImage, zones: Mapping[str, str] | None) -> str:
    """A concept's image as the gallery names it: the master, or a rendition's placement,
    pixels and safe zone."""
    if image.placement is None:
        return f"master {image.width}x{image.height}"
    zone = (zones or {}).get(image.placement)
    caption = f"{image.placement} {image.width}x{image.height}"
    return caption + (f" (keep the {zone} free of text)" if zone else "")
