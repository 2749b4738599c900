"""A campaign's gallery as a marketer sees it in Prefect's UI: each concept's master, then its
renditions side by side at their shapes, each named with its placement, pixels and safe zone.

A scenario: a real Prefect server, the command line a user runs, headless Chromium
(`UPDATE_SCREENSHOTS=1` writes the screenshot to `docs/campaign-gallery.png`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image
from test_end_to_end import chromium, server
from test_placements import CAMPAIGN as PLACEMENTS
from test_run_form import Browser

from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server

__all__ = ["chromium", "server"]  # the fixtures, shared with the end-to-end test

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "campaign-gallery.png"
README_HEIGHT = 880
"""The screenshot's pixels down to the end of the second concept's captions."""
COMMAND = str(Path(sys.executable).parent / "prefect-gpt-image")
WAIT_FOR_PICTURES = """new Promise((done, fail) => {
  const start = Date.now();
  const look = () => {
    const pictures = [...document.querySelectorAll('img')].filter(i => i.src.includes('/gallery-'));
    if (pictures.length >= %d && pictures.every(i => i.complete && i.naturalWidth > 0))
      done({shown: pictures.map(i => [i.naturalWidth, i.naturalHeight, i.width, i.height]),
            text: document.body.innerText});
    else if (Date.now() - start > 60000) fail('the gallery did not load');
    else setTimeout(look, 250);
  };
  look();
})"""


def test_the_gallery_shows_each_concept_with_its_renditions_side_by_side(
    server: tuple[str, dict[str, str]],
    chromium: str,
    api: GptImageEmulator,
    s3_server: LocalS3Server,
    user_env: dict[str, str],
    tmp_path: Path,
) -> None:
    api_url, _ = server
    bucket = f"gallery-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a ceramic mug on an oak table\na linen tote bag on a beach\n", "utf-8")
    flags = [arg for name in PLACEMENTS for arg in ("--placement", name)]

    result = subprocess.run(
        [COMMAND, "generate", str(prompts), "--bucket", f"s3://{bucket}", *flags],
        env={**user_env, "PREFECT_API_URL": api_url},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "2 images and 12 renditions stored" in result.stdout
    artifacts = httpx.post(
        f"{api_url}/artifacts/filter",
        json={"artifacts": {"type": {"any_": ["markdown"]}}, "sort": "CREATED_DESC", "limit": 1},
    ).json()
    page = f"{api_url.removesuffix('/api')}/artifacts/artifact/{artifacts[0]['id']}"

    update = os.environ.get("UPDATE_SCREENSHOTS") == "1"
    screenshot = SCREENSHOT if update else tmp_path / "campaign-gallery.png"
    with Browser(chromium, tmp_path / "chrome") as browser:
        [gallery] = browser.run(page, WAIT_FOR_PICTURES % 14, screenshot=screenshot)

    shown = gallery["shown"]
    assert len(shown) == 14  # two masters, six renditions each
    for natural_w, natural_h, width, height in shown:  # each at its shape, at one height
        assert abs(width / height / (natural_w / natural_h) - 1) < 0.02, (natural_w, natural_h)
        assert abs(height - 120) <= 1 or width == 480  # the widest, narrowed to fit
    text = gallery["text"]
    for name in PLACEMENTS:
        assert text.count(f"{name} ") == 2, name
    assert "meta-reels 1080x1920 (keep the top 14% and bottom 35% free of text)" in text
    assert screenshot.stat().st_size > 50_000  # a page with pictures, not a blank one
    if update:  # the README's picture: the gallery, without the empty page below it
        with Image.open(screenshot) as page_shot:
            page_shot.crop((0, 0, page_shot.width, README_HEIGHT)).save(screenshot)
