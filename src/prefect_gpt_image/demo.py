"""`prefect-gpt-image demo`: the real flow, end to end, with nothing to configure.

The flow runs on Prefect's embedded server, against a local emulator of the API
(the real one needs a paid key) and a local S3-compatible server whose bucket is
a plain folder. Prefect's home, and so the generation cache, live in the demo
folder: a second run is served from the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import SecretStr

from prefect_gpt_image.models import ImageRequest

DEMO_API_KEY = "demo-key-not-secret"
DEMO_BUCKET = "gpt-image-demo"
DEMO_PREFIX = "spring-campaign"
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

    from prefect_gpt_image.blocks.credentials import RapidAPICredentials
    from prefect_gpt_image.cli import print_report, progress_bar
    from prefect_gpt_image.errors import BatchFailedError
    from prefect_gpt_image.flows.generate_images import generate_images
    from prefect_gpt_image.testing import Fault, GptImageEmulator, LocalS3Server

    bucket_root = directory / "s3"
    print(f"Demo folder: {directory}")
    print("Starting the API emulator, a local S3 server and Prefect's embedded server...")
    with (
        GptImageEmulator(api_key=DEMO_API_KEY, shape="cycle", latency=0.3) as api,
        LocalS3Server(bucket_root) as s3,
    ):
        # Real APIs throttle and fail now and then: the flow retries these.
        api.add_fault(Fault.rate_limited(retry_after=1.0))
        api.add_fault(Fault.server_error(503))
        credentials = RapidAPICredentials(api_key=SecretStr(DEMO_API_KEY), base_url=api.base_url)
        try:
            with progress_bar():
                report = generate_images(
                    prompts=DEMO_PROMPTS,
                    bucket=s3.bucket_block(DEMO_BUCKET),
                    credentials=credentials,
                    prefix=DEMO_PREFIX,
                    max_concurrency=4,
                )
        except BatchFailedError as exc:
            print(f"The demo failed: {exc}")
            return 1

    print()
    print_report(report)
    print(f"\nThe images are plain files in {bucket_root / DEMO_BUCKET / DEMO_PREFIX}:")
    for key in dict.fromkeys(image.key for image in report.images):
        print(f"  {s3.object_path(DEMO_BUCKET, key)}")
    price = credentials.price_per_image_usd
    distinct = report.generated + report.from_cache
    print(
        f"\nFor real, these {len(DEMO_PROMPTS)} prompts ({distinct} distinct) would cost "
        f"${distinct * price:.2f} at ${price:.2f} an image; this run called the emulator "
        f"for {report.generated} of them and took {report.from_cache} from the cache."
    )
    print("Run the demo again: every image comes from the cache, and nothing is paid twice.")
    return 0
