"""The `prefect-gpt-image` command line: `generate` a prompt file, `price` it on each
route first, or run the `demo`.

Prefect and boto3 are imported only once a command runs, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from prefect_gpt_image._console import print_report, progress_bar
from prefect_gpt_image._image_sizes import IMAGE_SIZES, parse_size
from prefect_gpt_image.model_table import Complexity, Quality

if TYPE_CHECKING:
    from prefect_gpt_image._billing import RoutePrice
    from prefect_gpt_image.blocks._route import GptImageRoute

MAX_CONCURRENCY = 256
MAX_REQUESTS_PER_SECOND = 1000.0
"""The flow's own bounds on `max_concurrency` and `requests_per_second`, checked here so that
a typo is a usage error before Prefect starts."""


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
    _add_credentials(generate)
    generate.add_argument("--prefix", default="", help="folder for this run's images")
    _add_request_fields(generate)
    generate.add_argument(
        "--images",
        action="append",
        metavar="IMAGE",
        help="edit instead of generate: an image to edit with every prompt (a path or "
        "s3:// URI; repeat for more), or one s3:// folder or local directory of them",
    )
    _add_input_roots(generate)
    generate.add_argument("--mask", metavar="PNG", help="for edits: the area to repaint")
    generate.add_argument("--input-fidelity", choices=("high", "low"), help="for edits")
    generate.add_argument(
        "--max-concurrency", type=_whole(1, MAX_CONCURRENCY), default=8, metavar="N"
    )
    generate.add_argument(
        "--requests-per-second",
        type=_amount(above=0, at_most=MAX_REQUESTS_PER_SECOND),
        metavar="R",
        help="the plan's rate limit (default: learned from the API's 429s)",
    )
    generate.add_argument(
        "--max-cost-usd",
        type=_amount(at_least=0),
        metavar="USD",
        help="refuse a run whose new images would cost more, and stop at this spend",
    )
    generate.add_argument("--allow-failures", type=_whole(0), default=0, metavar="N")
    generate.add_argument(
        "--refresh-cache", action="store_true", help="generate again even where cached (pays)"
    )
    generate.add_argument(
        "--mode",
        choices=("sync", "batch"),
        default="sync",
        help="batch: through OpenAI's Batch API, at half price, within 24 hours; run the "
        "same command again to collect what is ready",
    )
    generate.add_argument(
        "--batch-wait-minutes",
        type=_amount(at_least=0, at_most=1440),
        default=10,
        metavar="M",
        help="with --mode batch: how long to wait for the batches before leaving them to a "
        "later run",
    )
    generate.add_argument(
        "--cancel-batches",
        action="store_true",
        help="with --mode batch: cancel these prompts' batches, store what they answered, "
        "send nothing new",
    )
    generate.set_defaults(command=_generate)

    price = commands.add_parser(
        "price",
        help="price a prompt file on each route before anything is paid",
        description=(
            "Check every prompt of a local prompt file against each route's model and print "
            "what the set would cost there at worst (auto quality priced as the model's "
            "dearest). Routes "
            "are the --credentials given (saved blocks' names) and the built-in models of "
            "each --model, or, with neither, RapidAPI's default route and every built-in "
            "model through OpenAI. Nothing is sent to any API, and the cache is not read."
        ),
    )
    price.add_argument("prompts_file", metavar="PROMPTS_FILE")
    _add_credentials(price)
    price.add_argument(
        "--model",
        action="append",
        metavar="MODEL",
        help="a model of the built-in table, priced through OpenAI (repeatable)",
    )
    _add_request_fields(price)
    _add_input_roots(price)
    price.set_defaults(command=_price)

    demo = commands.add_parser(
        "demo",
        help="run the flow against a local API emulator and a local S3 server",
        description=(
            "Runs the real flow on Prefect's embedded server against a local emulator of "
            "the API and a local S3-compatible server (rclone serve s3), and shows where "
            "the images landed: they are plain files in DIR. No key, no cost. With --ui, "
            "the flow runs on a Prefect server instead, whose UI shows the run's table "
            "and gallery."
        ),
    )
    demo.add_argument(
        "--dir", type=Path, default=Path("gpt-image-demo"), help="where everything goes"
    )
    demo.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    demo.add_argument(
        "--ui",
        action="store_true",
        help="run on a Prefect server instead, print the run's page in its UI, and keep "
        "the servers up until Ctrl-C",
    )
    demo.set_defaults(command=_demo)
    return parser


def _add_credentials(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--credentials",
        action="append",
        metavar="BLOCK",
        help=(
            "a saved RapidAPICredentials or OpenAICredentials block's name; repeat it for "
            "fallback routes, tried in order (default: RAPIDAPI_KEY from the environment)"
        ),
    )


def _add_input_roots(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--input-root",
        action="append",
        metavar="FOLDER",
        help="a folder (local, or s3://bucket/prefix/) whose images the prompt file may "
        "name, besides those below its own folder; repeat for more. A row naming an image "
        "anywhere else is refused, and nothing is read for it",
    )


def _add_request_fields(command: argparse.ArgumentParser) -> None:
    """The request fields the flow takes as defaults for prompts that do not give them."""
    command.add_argument(
        "--size",
        default="1024x1024",
        type=_size,
        metavar="WxH",
        help=f"size of prompts that do not give one: {', '.join(IMAGE_SIZES)}, or any "
        "size the model makes (default: %(default)s)",
    )
    command.add_argument(
        "--quality",
        choices=get_args(Quality),
        help="xhigh and max on gpt-image-2.5 and 2.6 only",
    )
    command.add_argument("--complexity", choices=get_args(Complexity), help="gpt-image-2.6 only")
    command.add_argument(
        "--n", type=_whole(1), default=1, metavar="N", help="images per prompt (default: 1)"
    )
    command.add_argument("--output-format", choices=("png", "jpeg", "webp"))
    command.add_argument("--output-compression", type=_whole(0, 100), metavar="PERCENT")
    command.add_argument("--background", choices=("transparent", "opaque", "auto"))
    command.add_argument("--moderation", choices=("low", "auto"))


def _one_or_many(values: list[str] | None) -> list[str] | str | None:
    """One `--images` is a file or a folder; several are files."""
    return values[0] if values and len(values) == 1 else values


def _size(text: str) -> str:
    try:
        width, height = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1536x1024") from None
    return f"{width}x{height}"


def _whole(at_least: int, at_most: int | None = None) -> Callable[[str], int]:
    """An argparse type for a count: argparse turns its refusal into a usage error (exit 2),
    where the flow's own check would come late, as a traceback."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < at_least or (at_most is not None and value > at_most):
            bound = f"{at_least} to {at_most}" if at_most is not None else f"{at_least} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {bound}")
        return value

    return parse


def _amount(
    *, at_least: float | None = None, above: float | None = None, at_most: float | None = None
) -> Callable[[str], float]:
    """An argparse type for a finite number within bounds, refused as `_whole` refuses."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {at_least:g} or more")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give more than {above:g}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {at_most:g} at most")
        return value

    return parse


def _request_fields(args: argparse.Namespace) -> dict[str, object]:
    width, height = parse_size(args.size)
    return {
        "width": width,
        "height": height,
        "quality": args.quality,
        "n": args.n,
        "output_format": args.output_format,
        "output_compression": args.output_compression,
        "background": args.background,
        "moderation": args.moderation,
        "complexity": args.complexity,
    }


def _generate(args: argparse.Namespace) -> int:
    from prefect_gpt_image._object_keys import normalize_prefix
    from prefect_gpt_image._prompt_sets import read_prompt_set
    from prefect_gpt_image.errors import GptImageError, RunFailedError
    from prefect_gpt_image.flows.generate_images import generate_images

    try:
        # A local file is checked before a flow run starts, so a typo is a one-line error.
        # The flow checks again, as it does for every caller; rows refused for their
        # images fail alone there.
        if not args.prompts_file.startswith("s3://"):
            read_prompt_set(
                args.prompts_file,
                defaults=_request_fields(args),
                input_roots=args.input_root or (),
            )
        normalize_prefix(args.prefix)
        with progress_bar():
            report = generate_images(
                prompts=args.prompts_file,
                bucket=args.bucket,
                credentials=args.credentials,
                prefix=args.prefix,
                size=args.size,
                quality=args.quality,
                n=args.n,
                output_format=args.output_format,
                output_compression=args.output_compression,
                background=args.background,
                moderation=args.moderation,
                complexity=args.complexity,
                images=_one_or_many(args.images),
                input_roots=args.input_root,
                mask=args.mask,
                input_fidelity=args.input_fidelity,
                max_concurrency=args.max_concurrency,
                requests_per_second=args.requests_per_second,
                max_cost_usd=args.max_cost_usd,
                allow_failures=args.allow_failures,
                refresh_cache=args.refresh_cache,
                mode=args.mode,
                batch_wait_minutes=args.batch_wait_minutes,
                cancel_batches=args.cancel_batches,
            )
    except RunFailedError as exc:
        print_report(exc.report)
        print(f"\nFailed: {exc}", file=sys.stderr)
        return 1
    except GptImageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


def _price(args: argparse.Namespace) -> int:
    from prefect_gpt_image._billing import price_on_route
    from prefect_gpt_image._prompt_sets import read_prompt_set
    from prefect_gpt_image.errors import GptImageError

    try:
        prompt_set = read_prompt_set(
            args.prompts_file, defaults=_request_fields(args), input_roots=args.input_root or ()
        )
        requests = prompt_set.admitted
        routes = _pricing_routes(args.credentials, args.model)
        prices = [price_on_route(requests, route) for route in routes]
    except GptImageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(requests)} requests in {args.prompts_file}; the most they can cost:")
    if prompt_set.refused:
        first = prompt_set.refused[min(prompt_set.refused)]
        print(f"  ({len(prompt_set.refused)} rows refused, not priced: {first})")
    width = max(len(f"{p.route} {p.model}") for p in prices)
    for price in prices:
        where = f"{price.route} {price.model}".ljust(width)
        cost = f"${price.worst_case_usd:,.2f}".rjust(10)
        line = f"  {where}  {cost}  for {price.images} images"
        if price.batch_worst_case_usd is not None:
            line += f" (${price.batch_worst_case_usd:,.2f} through the Batch API)"
        if price.refused:
            line += f"; {len(price.refused)} requests refused, e.g. {price.refused[0]}"
        print(line)
        print(f"  {''.ljust(width)}  {_model_terms(price)}")
    return 0


def _model_terms(price: RoutePrice) -> str:
    """What the route's model charges and offers: its price and qualities."""
    if price.flat_price_usd is not None:
        terms = [f"${price.flat_price_usd:,.2f} per image"]
    elif price.image_output_per_million_usd is not None:
        terms = [f"image output ${price.image_output_per_million_usd:,.2f} per million tokens"]
    else:
        terms = []
    terms.append(f"qualities {', '.join(price.qualities)}")
    if price.complexities:
        terms.append(f"complexity {', '.join(price.complexities)}")
    return "; ".join(terms)


def _pricing_routes(names: list[str] | None, models: list[str] | None) -> list[GptImageRoute]:
    from pydantic import SecretStr

    from prefect_gpt_image._block_refs import resolve_routes
    from prefect_gpt_image.blocks.credentials import RapidAPICredentials
    from prefect_gpt_image.blocks.openai_credentials import OpenAICredentials
    from prefect_gpt_image.model_table import MODELS, model_spec

    unused_key = SecretStr("not-used-for-pricing")
    routes: list[GptImageRoute] = resolve_routes(list(names)) if names else []
    if not names and not models:
        routes.append(RapidAPICredentials(api_key=unused_key))
        models = list(MODELS)
    for model in models or []:
        model_spec(model)  # an unknown model says how to describe it
        routes.append(OpenAICredentials(api_key=unused_key, model=model))
    return routes


def _demo(args: argparse.Namespace) -> int:
    from prefect_gpt_image.demo import run_demo

    return run_demo(args.dir, verbose=args.verbose, ui=args.ui)


if __name__ == "__main__":
    sys.exit(main())
