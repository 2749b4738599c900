"""The `prefect-gpt-image` command line: `generate` a prompt file, `price` it on each
route first, `publish` what a review approved, or run the `demo`.

Prefect and boto3 are imported only once a command runs, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, get_args

from prefect_gpt_image._console import print_report, progress_bar
from prefect_gpt_image._image_sizes import IMAGE_SIZES
from prefect_gpt_image.model_table import Background, Complexity, Moderation, OutputFormat, Quality
from prefect_gpt_image.models import InputFidelity
from prefect_gpt_image.placement_table import Adapt

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from prefect_gpt_image._billing import RoutePrice
    from prefect_gpt_image._form_schema import OptionGroup
    from prefect_gpt_image._routes import Route

Group = TypeVar("Group", bound="OptionGroup")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except _FlagError as exc:  # before anything runs: a usage error, as argparse's own
        parser: argparse.ArgumentParser = args.parser
        flags = [a.option_strings[-1] for a in parser._actions if a.dest == exc.dest]
        parser.error(f"argument {flags[0] if flags else exc.dest}: {exc}")


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
    generate.add_argument(
        "--max-cost-usd",
        type=_amount,
        metavar="USD",
        help="refuse a run whose new images would cost more, and stop at this spend",
    )
    generate.add_argument("--allow-failures", type=_count, default=0, metavar="N")
    _add_image_options(generate)
    _add_placement_options(generate)
    _add_edit_options(generate)
    _add_batch_options(generate)
    _add_limits(generate)
    _add_cache_options(generate)
    _add_link_options(generate)
    generate.set_defaults(command=_generate, parser=generate)

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
    _add_image_options(price)
    _add_placement_options(price, adapt=False)
    _add_input_roots(price.add_argument_group("edit"))
    price.set_defaults(command=_price, parser=price)

    publish = commands.add_parser(
        "publish",
        help="publish images of a run's manifest, as a review would, without a flow run",
        description=(
            "Copy the images a run's manifest names (each with its renditions), server-side, "
            "to the publish folder beside them, and record the decision in the manifest: for "
            "a run whose review timed out, or images approved outside Prefect. A name the "
            "manifest does not hold is refused, and nothing is published."
        ),
    )
    publish.add_argument("manifest", metavar="MANIFEST_URI", help="s3://bucket/key of the manifest")
    chosen = publish.add_mutually_exclusive_group(required=True)
    chosen.add_argument(
        "--approve",
        action="append",
        metavar="NAME",
        help="an image's name, as the run's gallery and table show it (repeatable)",
    )
    chosen.add_argument("--approve-all", action="store_true", help="every image of the run")
    publish.add_argument(
        "--publish-prefix",
        default="published",
        metavar="FOLDER",
        help="the folder beside the images to publish to (default: published)",
    )
    publish.add_argument(
        "--bucket",
        metavar="BLOCK",
        help="a saved S3Bucket block whose credentials read the bucket (default: AWS_*)",
    )
    publish.set_defaults(command=_publish, parser=publish)

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


def _add_image_options(command: argparse.ArgumentParser) -> None:
    """`ImageOptions`: a flag left unset leaves its field to the model's default."""
    image = command.add_argument_group(
        "image", "what every image looks like, for prompts that do not say otherwise"
    )
    image.add_argument(
        "--size",
        dest="image.size",
        metavar="WxH",
        help=f"{', '.join(IMAGE_SIZES)}, or any size the model makes (default: 1024x1024)",
    )
    image.add_argument(
        "--quality",
        dest="image.quality",
        choices=get_args(Quality),
        help="xhigh and max on gpt-image-2.5 and 2.6 only",
    )
    image.add_argument(
        "--complexity", dest="image.complexity", choices=get_args(Complexity), help="gpt-image-2.6"
    )
    image.add_argument("--n", dest="image.n", metavar="N", help="images per prompt (default: 1)")
    image.add_argument(
        "--output-format", dest="image.output_format", choices=get_args(OutputFormat)
    )
    image.add_argument("--output-compression", dest="image.output_compression", metavar="PERCENT")
    image.add_argument("--background", dest="image.background", choices=get_args(Background))
    image.add_argument("--moderation", dest="image.moderation", choices=get_args(Moderation))


def _add_placement_options(command: argparse.ArgumentParser, *, adapt: bool = True) -> None:
    group = command.add_argument_group(
        "placements", "each image delivered at each placement's exact pixels, format and size"
    )
    group.add_argument(
        "--placement",
        action="append",
        dest="placements",
        default=[],
        metavar="NAME|WxH",
        help="a preset's name (e.g. meta-feed-portrait, display-medium-rectangle) or "
        "WIDTHxHEIGHT (repeatable)",
    )
    if adapt:
        group.add_argument(
            "--adapt",
            choices=get_args(Adapt),
            default="crop",
            help="how a master becomes a placement of another shape: cut from it (crop, the "
            "default), its canvas extended by an edit (extend), or generated again (generate)",
        )


def _add_input_roots(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--input-root",
        dest="edit.input_roots",
        action="append",
        metavar="FOLDER",
        help="a folder (local, or s3://bucket/prefix/) whose images the prompt file may "
        "name, besides those below its own folder; repeat for more. A row naming an image "
        "anywhere else is refused, and nothing is read for it",
    )


def _add_edit_options(command: argparse.ArgumentParser) -> None:
    edit = command.add_argument_group("edit", "edit images instead of generating them")
    edit.add_argument(
        "--images",
        dest="edit.images",
        action="append",
        metavar="IMAGE",
        help="an image to edit with every prompt (a path or s3:// URI; repeat for more), or "
        "one s3:// folder or local directory of them",
    )
    edit.add_argument("--mask", dest="edit.mask", metavar="PNG", help="the area to repaint")
    edit.add_argument(
        "--input-fidelity", dest="edit.input_fidelity", choices=get_args(InputFidelity)
    )
    _add_input_roots(edit)


def _add_batch_options(command: argparse.ArgumentParser) -> None:
    batch = command.add_argument_group(
        "batch (OpenAI's Batch API)",
        "half the price, answered within 24 hours; run the same command again to collect "
        "what is ready",
    )
    batch.add_argument(
        "--mode",
        choices=("sync", "batch"),
        default="sync",
        help="batch: send the new requests through OpenAI's Batch API (default: sync)",
    )
    batch.add_argument(
        "--batch-wait-minutes",
        dest="batch.wait_minutes",
        metavar="M",
        help="how long to wait for the batches before leaving them to a later run (default: 10)",
    )
    batch.add_argument(
        "--cancel-batches",
        dest="batch.cancel",
        action="store_true",
        default=None,
        help="cancel these prompts' batches, store what they answered, send nothing new",
    )


def _add_limits(command: argparse.ArgumentParser) -> None:
    limits = command.add_argument_group(
        "limits",
        "how busy the run may keep the API; a flag left out takes its GPT_IMAGE_* setting",
    )
    limits.add_argument(
        "--max-concurrency",
        dest="limits.max_concurrency",
        metavar="N",
        help="requests in flight at once (default: GPT_IMAGE_MAX_CONCURRENCY, or 8)",
    )
    limits.add_argument(
        "--requests-per-second",
        dest="limits.requests_per_second",
        metavar="R",
        help="the plan's rate limit (default: GPT_IMAGE_REQUESTS_PER_SECOND, or learned from "
        "the API's 429s)",
    )
    limits.add_argument(
        "--global-concurrency-limit",
        dest="limits.global_concurrency_limit",
        metavar="NAME",
        help="a Prefect global concurrency limit capping requests in flight across workers",
    )
    limits.add_argument(
        "--global-rate-limit",
        dest="limits.global_rate_limit",
        metavar="NAME",
        help="a Prefect global concurrency limit with slot decay: a rate across workers",
    )


def _add_cache_options(command: argparse.ArgumentParser) -> None:
    cache = command.add_argument_group(
        "cache",
        "a prompt asked for again is served from the cache, unpaid; a flag left out takes "
        "its GPT_IMAGE_* setting",
    )
    cache.add_argument(
        "--refresh-cache",
        dest="cache.refresh",
        action="store_true",
        default=None,
        help="generate again even where cached (pays)",
    )
    cache.add_argument(
        "--cache-expiration-days",
        dest="cache.expiration_days",
        metavar="DAYS",
        help="how long images are served from the cache (default: for good)",
    )
    cache.add_argument(
        "--cache-storage",
        dest="cache.storage",
        metavar="BLOCK",
        help="a saved S3Bucket block's name or s3://bucket/folder, shared by workers on "
        "other machines (default: Prefect's result storage)",
    )
    cache.add_argument(
        "--redis-lock-url",
        dest="cache.redis_lock_url",
        metavar="URL",
        help="redis://host:6379/0 holding the cache's locks across machines",
    )


def _add_link_options(command: argparse.ArgumentParser) -> None:
    links = command.add_argument_group(
        "links",
        "the links in the run's artifacts; a flag left out takes its GPT_IMAGE_* setting",
    )
    links.add_argument(
        "--public-base-url",
        dest="links.public_base_url",
        metavar="URL",
        help="where the bucket is served publicly (default: presigned links)",
    )
    links.add_argument(
        "--link-expiry-hours",
        dest="links.expiry_hours",
        metavar="HOURS",
        help="how long presigned links work (default: 24)",
    )


def _count(text: str) -> int:
    """An argparse type for a count of 0 or more: argparse turns its refusal into a usage
    error (exit 2), where the flow's own check would come late, as a traceback."""
    return int(_number(text, int, at_least=0))


def _amount(text: str) -> float:
    """An argparse type for a finite amount of 0 or more, refused as `_count` refuses."""
    return _number(text, float, at_least=0)


def _number(
    text: str,
    kind: type[int] | type[float],
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
) -> float:
    """`text` as a number of `kind` within the bounds, or the refusal a person reads."""
    try:
        value = kind(text)
    except ValueError:
        whole = " whole" if kind is int else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a{whole} number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if above is not None and value <= above:
        raise argparse.ArgumentTypeError(f"{text} is out of range: give more than {above:g}")
    low = at_least is not None and value < at_least
    if low or (at_most is not None and value > at_most):
        if at_least is not None and at_most is not None:
            bound = f"{at_least:g} to {at_most:g}"
        else:
            bound = f"{at_least:g} or more" if low else f"{at_most:g} at most"
        raise argparse.ArgumentTypeError(f"{text} is out of range: give {bound}")
    return value


def _within_field(text: str, field: FieldInfo) -> None:
    """Refuse `text` as `_number` does, by the bounds of the numeric option field it is
    for."""
    if field.annotation not in (int, float, int | None, float | None):
        return
    bounds: dict[str, float] = {}
    for rule in field.metadata:
        for name, key in (("ge", "at_least"), ("gt", "above"), ("le", "at_most")):
            if (bound := getattr(rule, name, None)) is not None:
                bounds[key] = bound
    kind = int if field.annotation in (int, int | None) else float
    _number(text, kind, **bounds)


class _FlagError(Exception):
    """A flag's value an option group refused: a usage error, naming the flag."""

    def __init__(self, dest: str, message: str) -> None:
        super().__init__(message)
        self.dest = dest


def _options(args: argparse.Namespace, name: str, model: type[Group]) -> Group:
    """The flow's option group `name` as the flags set it: a flag's `dest` is `name.field`,
    and a flag left unset leaves its field unset, for the model's default or the
    environment's setting to fill."""
    from pydantic import ValidationError

    given = {
        dest.removeprefix(f"{name}."): value
        for dest, value in vars(args).items()
        if dest.startswith(f"{name}.") and value is not None
    }
    if name == "edit" and "images" in given:  # one --images is a file or a folder
        given["images"] = given["images"][0] if len(given["images"]) == 1 else given["images"]
    if name == "batch":
        given["enabled"] = args.mode == "batch"
    try:
        return model.model_validate(given)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0])
        message = error["msg"].removeprefix("Value error, ")  # a validator's names the value
        if isinstance(value := error["input"], str) and field in model.model_fields:
            try:  # a number out of bounds: in the words of the flags' own numbers
                _within_field(value, model.model_fields[field])
            except argparse.ArgumentTypeError as refusal:
                message = str(refusal)
        if error["type"] != "value_error" and message == error["msg"]:
            message = f"{message} (got {error['input']!r})"
        raise _FlagError(f"{name}.{field}", message) from None


def _generate(args: argparse.Namespace) -> int:
    from prefect_gpt_image._object_keys import normalize_prefix
    from prefect_gpt_image._prompt_sets import read_prompt_set
    from prefect_gpt_image.errors import GptImageError, RunFailedError
    from prefect_gpt_image.flows.generate_images import generate_images
    from prefect_gpt_image.models import ApiLimits
    from prefect_gpt_image.options import (
        BatchOptions,
        CacheOptions,
        EditOptions,
        ImageOptions,
        LinkOptions,
    )

    image = _options(args, "image", ImageOptions)
    edit = _options(args, "edit", EditOptions)
    batch = _options(args, "batch", BatchOptions)
    limits = _options(args, "limits", ApiLimits)
    cache = _options(args, "cache", CacheOptions)
    links = _options(args, "links", LinkOptions)
    try:
        # A local file is checked before a flow run starts, so a typo is a one-line error.
        # The flow checks again, as it does for every caller; rows refused for their
        # images fail alone there.
        if not args.prompts_file.startswith("s3://"):
            read_prompt_set(
                args.prompts_file,
                defaults=image.request_fields(),
                input_roots=edit.input_roots,
            )
        normalize_prefix(args.prefix)
        with progress_bar():
            report = generate_images(
                args.prompts_file,
                image=image,
                edit=edit,
                max_cost_usd=args.max_cost_usd,
                allow_failures=args.allow_failures,
                batch=batch,
                bucket=args.bucket,
                prefix=args.prefix,
                credentials=args.credentials,
                limits=limits,
                cache=cache,
                links=links,
                placements=args.placements,
                adapt=args.adapt,
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
    from prefect_gpt_image._image_sizes import parse_size
    from prefect_gpt_image._placement_plan import price_strategies
    from prefect_gpt_image._prompt_sets import read_prompt_set
    from prefect_gpt_image.errors import GptImageError
    from prefect_gpt_image.options import EditOptions, ImageOptions
    from prefect_gpt_image.placement_table import resolve_placements

    image = _options(args, "image", ImageOptions)
    edit = _options(args, "edit", EditOptions)
    try:
        prompt_set = read_prompt_set(
            args.prompts_file, defaults=image.request_fields(), input_roots=edit.input_roots
        )
        requests = prompt_set.admitted
        routes = _pricing_routes(args.credentials, args.model)
        prices = [price_on_route(requests, route) for route in routes]
        placements = resolve_placements(args.placements)
        size = parse_size(image.size) if "size" in image.given() else None
        strategies = [
            price_strategies(requests, placements, route, size) if placements else None
            for route in routes
        ]
    except GptImageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(requests)} requests in {args.prompts_file}; the most they can cost:")
    if prompt_set.refused:
        first = prompt_set.refused[min(prompt_set.refused)]
        print(f"  ({len(prompt_set.refused)} rows refused, not priced: {first})")
    if placements:
        names = ", ".join(placement.name for placement in placements)
        print(f"  each at {len(placements)} placements ({names}); by how they are adapted:")
    width = max(len(f"{p.route} {p.model}") for p in prices)
    for price, by_strategy in zip(prices, strategies, strict=True):
        where = f"{price.route} {price.model}".ljust(width)
        cost = f"${price.worst_case_usd:,.2f}".rjust(10)
        line = f"  {where}  {cost}  for {price.images} images"
        if price.batch_worst_case_usd is not None:
            line += f" (${price.batch_worst_case_usd:,.2f} through the Batch API)"
        if price.refused:
            line += f"; {len(price.refused)} requests refused, e.g. {price.refused[0]}"
        if by_strategy is not None:
            line = f"  {where}  " + "  ".join(
                f"{adapt} {_strategy_cost(cost)}" for adapt, cost in by_strategy.items()
            )
            refused = [
                f"{adapt}: {cost}" for adapt, cost in by_strategy.items() if isinstance(cost, str)
            ]
            line += "".join(f"\n  {''.ljust(width)}  ({reason})" for reason in refused)
        print(line)
        print(f"  {''.ljust(width)}  {_model_terms(price)}")
    return 0


def _strategy_cost(cost: float | str) -> str:
    return f"${cost:,.2f}" if isinstance(cost, float) else "refused"


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


def _pricing_routes(names: list[str] | None, models: list[str] | None) -> list[Route]:
    from pydantic import SecretStr

    from prefect_gpt_image.blocks._loading import resolve_routes
    from prefect_gpt_image.blocks.credentials import RapidAPICredentials
    from prefect_gpt_image.blocks.openai_credentials import OpenAICredentials
    from prefect_gpt_image.model_table import MODELS, model_spec

    unused_key = SecretStr("not-used-for-pricing")
    routes: list[Route] = resolve_routes(list(names)) if names else []
    if not names and not models:
        routes.append(RapidAPICredentials(api_key=unused_key))
        models = list(MODELS)
    for model in models or []:
        model_spec(model)  # an unknown model says how to describe it
        routes.append(OpenAICredentials(api_key=unused_key, model=model))
    return routes


def _publish(args: argparse.Namespace) -> int:
    from prefect_gpt_image._object_keys import split_s3_uri
    from prefect_gpt_image._review import publish_from_manifest
    from prefect_gpt_image.blocks._loading import resolve_bucket
    from prefect_gpt_image.errors import GptImageError

    try:
        bucket_name, key = split_s3_uri(args.manifest)
        bucket = resolve_bucket(args.bucket or f"s3://{bucket_name}")
        if bucket.bucket_name != bucket_name:
            bucket = bucket.model_copy(update={"bucket_name": bucket_name, "bucket_folder": ""})
        approved = None if args.approve_all else args.approve
        published = publish_from_manifest(bucket, key, approved, args.publish_prefix)
    except GptImageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    for image in published:
        print(image.uri)
    print(f"{len(published)} object(s) published.")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from prefect_gpt_image.demo import run_demo

    return run_demo(args.dir, verbose=args.verbose, ui=args.ui)


if __name__ == "__main__":
    sys.exit(main())
