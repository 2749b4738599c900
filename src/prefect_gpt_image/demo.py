"""`prefect-gpt-image demo`: the real flow, end to end, with nothing to configure.

The flow runs on Prefect's embedded server, against a local emulator of the API
(the real one needs a paid key) and a local S3-compatible server whose bucket is
a plain folder. Prefect's home, and so the generation cache, live in the demo
folder: a second run is served from the cache.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from pydantic import SecretStr

from prefect_gpt_image.models import ImageRequest

DEMO_API_KEY = "demo-key-not-secret"
DEMO_BUCKET = "gpt-image-demo"
DEMO_PREFIX = "spring-campaign"
RETIRED_MODEL = "gpt-image-1.5"
SUCCESSOR_MODEL = "gpt-image-2"
DEMO_PROMPTS: list[str | ImageRequest] = [
    "a ceramic coffee mug on a sunlit kitchen table, soft morning light, product photo",
    "running shoes on a wet city street at dusk, neon reflections, advertising style",
    "a minimalist poster of a mountain lake at sunrise, flat pastel colours",
    "a cosy reading nook with a wool blanket and a steaming cup of tea, warm tones",
    "Café au lait et croissant sur une terrasse parisienne, photographie éditoriale",
    "東京の夜景、雨上がりのネオン、シネマティックな写真",
    "a ceramic coffee mug on a sunlit kitchen table, soft morning light, product photo",
    "a vintage bicycle leaning against a yellow wall, summer afternoon, 35mm film",
    "an isometric illustration of a tiny bakery shop, bright and friendly",
    "a bottle of olive oil with fresh basil and tomatoes, rustic wooden board",
    "a smartwatch on a marble surface, studio lighting, minimal composition",
    "a paper boat on a calm pond with autumn leaves, watercolour",
]
"""A campaign's worth of prompts, with one duplicate and two non-English ones."""


def run_demo(directory: Path, *, verbose: bool = False) -> int:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    # Before Prefect is imported: a Prefect home of the demo's own means no profile
    # points at another server, and the cache stays with the demo.
    os.environ["PREFECT_HOME"] = str(directory / "prefect-home")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.pop("PREFECT_API_URL", None)

    from prefect_gpt_image.blocks.openai_credentials import OpenAICredentials
    from prefect_gpt_image.cli import print_report, progress_bar
    from prefect_gpt_image.errors import BatchFailedError
    from prefect_gpt_image.flows.generate_images import generate_images
    from prefect_gpt_image.testing import Fault, GptImageEmulator, LocalS3Server

    bucket_root = directory / "s3"
    print(f"Demo folder: {directory}")
    print("Starting the API emulator, a local S3 server and Prefect's embedded server...")
    with (
        GptImageEmulator(api_key=DEMO_API_KEY, port=_emulator_port(directory), latency=0.3) as api,
        LocalS3Server(bucket_root) as s3,
    ):
        # gpt-image-1.5 shut down on 2026-12-01: the first route answers "model not found",
        # and the batch moves to the second, gpt-image-2, after a call or two.
        api.models.pop(RETIRED_MODEL, None)
        routes = [
            OpenAICredentials(
                api_key=SecretStr(DEMO_API_KEY), base_url=api.openai_base_url, model=model
            )
            for model in (RETIRED_MODEL, SUCCESSOR_MODEL)
        ]
        # Real APIs throttle and fail now and then: the flow retries these.
        api.add_fault(Fault.rate_limited(retry_after=1.0))
        api.add_fault(Fault.server_error(503))
        try:
            with progress_bar():
                report = generate_images(
                    prompts=DEMO_PROMPTS,
                    bucket=s3.bucket_block(DEMO_BUCKET),
                    credentials=routes,
                    prefix=DEMO_PREFIX,
                    quality="medium",
                    max_concurrency=4,
                )
        except BatchFailedError as exc:
            print(f"The demo failed: {exc}")
            return 1
        retired_calls = sum(call.model == RETIRED_MODEL for call in api.calls)

    print()
    print_report(report)
    print(f"\nThe images are plain files in {bucket_root / DEMO_BUCKET / DEMO_PREFIX}:")
    for key in dict.fromkeys(image.key for image in report.images):
        print(f"  {s3.object_path(DEMO_BUCKET, key)}")
    if report.generated:
        print(
            f"\n{RETIRED_MODEL} answered 'model not found' {retired_calls} time(s); every image "
            f"came from {SUCCESSOR_MODEL}. For real, this run would have cost "
            f"${report.cost_usd:.2f}: each image's usage at {SUCCESSOR_MODEL}'s token prices."
        )
    print(
        f"This run called the emulator for {report.generated} images and took "
        f"{report.from_cache} from the cache. Run the demo again: every image comes from the "
        "cache, and nothing is paid twice."
    )
    return 0


def _emulator_port(directory: Path) -> int:
    """The port the demo's emulator had last time, where it is free: the endpoint's URL is
    part of the cache key, so a second run on another port would pay again."""
    saved = directory / "emulator-port"
    with contextlib.suppress(OSError, ValueError):
        port = int(saved.read_text())
        with socket.socket() as probe:  # as the server binds: past the last run's TIME_WAIT
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
        return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    saved.write_text(str(port))
    return port
