"""What the command line prints about a run, shared by `cli` and `demo`.

A module of its own, so that neither of the two imports the other for it. Rich is
imported only when a bar is shown, so that `--help` stays instant.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect_gpt_image.models import RunReport

PROGRESS_BAR_MIN_PROMPTS = 10
"""Shorter batches finish before a progress bar would tell anything."""
REPORT_MAX_IMAGES = 20
"""A terminal's worth; the manifest lists every image."""


def print_report(report: RunReport) -> None:
    """Where each image landed, what failed, and the run's summary line."""
    for image in report.images[:REPORT_MAX_IMAGES]:
        print(f"  {image.uri}  ({image.width}x{image.height}, {image.size:,} bytes)")
    if len(report.images) > REPORT_MAX_IMAGES:
        print(f"  ... and {len(report.images) - REPORT_MAX_IMAGES} more")
    for failure in report.failures:
        at = f" at {failure.placement}" if failure.placement else ""
        print(f"  FAILED {failure.prompt[:60]!r}{at}: {failure.error}")
    for waiting in report.waiting[:REPORT_MAX_IMAGES]:
        print(f"  WAITING {waiting.prompt[:60]!r} in OpenAI batch {waiting.batch_id}")
    print(report.summary())
    if report.manifest_uri:
        print(f"Manifest: {report.manifest_uri}")


@contextmanager
def progress_bar() -> Iterator[None]:
    """A progress bar on stderr for long batches in a terminal."""
    from rich.console import Console
    from rich.progress import Progress

    from prefect_gpt_image import _progress as progress

    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("Generating", total=None, visible=False)

        def update(done: int, total: int) -> None:
            visible = total >= PROGRESS_BAR_MIN_PROMPTS
            bar.update(task, completed=done, total=total, visible=visible)

        stop = progress.subscribe(update)
        try:
            yield
        finally:
            stop()
