"""The `prefect-gpt-image` command line: `generate` a prompt file, or run the `demo`.

Prefect and boto3 are imported only once a command runs, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from prefect_gpt_image.image_sizes import IMAGE_SIZES, parse_size

if TYPE_CHECKING:
    from prefect_gpt_image.models import BatchReport

PROGRESS_BAR_MIN_PROMPTS = 10
"""Shorter batches finish before a progress bar would tell anything."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    return command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefect-gpt-image",
        description="Generate images with GPT Image in Prefect and store them in S3.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        help="generate an image for every prompt in a file and store them in a bucket",
        description=(
            "Run the generate-images flow over a prompt file (.txt, one prompt a line; "
            ".csv with a prompt column; or .jsonl), local or s3://."
        ),
    )
    generate.add_argument("prompts_file", metavar="PROMPTS_FILE")
    generate.add_argument(
        "--bucket",
        required=True,
        help="a saved S3Bucket block's name, or s3://bucket/folder with AWS_* credentials",
    )
    generate.add_argument(
        "--credentials",
        help="a saved RapidAPICredentials block's name (default: RAPIDAPI_KEY from the env)",
    )
    generate.add_argument("--prefix", default="", help="folder for this batch's images")
    generate.add_argument(
        "--size",
        default="1024x1024",
        choices=IMAGE_SIZES,
        help="size of prompts that do not give one (default: %(default)s)",
    )
    generate.add_argument("--max-concurrency", type=int, default=8, metavar="N")
    generate.add_argument(
        "--requests-per-second",
        type=float,
        metavar="R",
        help="the plan's rate limit (default: learned from the API's 429s)",
    )
    generate.add_argument(
        "--max-cost-usd",
        type=float,
        metavar="USD",
        help="refuse a batch whose new images would cost more, and stop at this spend",
    )
    generate.add_argument("--allow-failures", type=int, default=0, metavar="N")
    generate.add_argument(
        "--refresh-cache", action="store_true", help="generate again even where cached (pays)"
    )
    generate.set_defaults(command=_generate)

    demo = commands.add_parser(
        "demo",
        help="run the flow against a local API emulator and a local S3 server",
        description=(
            "Runs the real flow on Prefect's embedded server against a local emulator of "
            "the API and a local S3-compatible server (rclone serve s3), and shows where "
            "the images landed: they are plain files in DIR. No key, no cost."
        ),
    )
    demo.add_argument(
        "--dir", type=Path, default=Path("gpt-image-demo"), help="where everything goes"
    )
    demo.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    demo.set_defaults(command=_demo)
    return parser


def _generate(args: argparse.Namespace) -> int:
    from prefect_gpt_image.errors import BatchFailedError, GptImageError
    from prefect_gpt_image.flows.generate_images import generate_images
    from prefect_gpt_image.object_keys import normalize_prefix
    from prefect_gpt_image.prompt_sets import load_prompts

    try:
        # A local file is checked before a flow run starts, so a typo is a one-line error.
        # The flow checks again, as it does for every caller.
        if not args.prompts_file.startswith("s3://"):
            width, height = parse_size(args.size)
            load_prompts(args.prompts_file, width=width, height=height)
        normalize_prefix(args.prefix)
        with progress_bar():
            report = generate_images(
                prompts=args.prompts_file,
                bucket=args.bucket,
                credentials=args.credentials,
                prefix=args.prefix,
                size=args.size,
                max_concurrency=args.max_concurrency,
                requests_per_second=args.requests_per_second,
                max_cost_usd=args.max_cost_usd,
                allow_failures=args.allow_failures,
                refresh_cache=args.refresh_cache,
            )
    except BatchFailedError as exc:
        print_report(exc.report)
        print(f"\nFailed: {exc}", file=sys.stderr)
        return 1
    except GptImageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from prefect_gpt_image.demo import run_demo

    return run_demo(args.dir, verbose=args.verbose)


def print_report(report: BatchReport) -> None:
    for image in report.images[:20]:
        print(f"  {image.uri}  ({image.width}x{image.height}, {image.size:,} bytes)")
    if len(report.images) > 20:
        print(f"  ... and {len(report.images) - 20} more")
    for failure in report.failures:
        print(f"  FAILED {failure.prompt[:60]!r}: {failure.error}")
    print(report.summary())
    if report.manifest_uri:
        print(f"Manifest: {report.manifest_uri}")


@contextmanager
def progress_bar() -> Iterator[None]:
    """A progress bar on stderr for long batches in a terminal."""
    from rich.console import Console
    from rich.progress import Progress

    from prefect_gpt_image import progress

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


if __name__ == "__main__":
    sys.exit(main())
