"""`prefect-gpt-image demo`: the real flow, end to end, with nothing to configure.

The flow runs on Prefect's embedded server, against a local emulator of the API
(the real one needs a paid key) and a local S3-compatible server whose bucket is
a plain folder. Prefect's home, and so the generation cache, live in the demo
folder: a second run is served from the cache.

With `--ui`, a Prefect server of the demo's own takes the embedded server's place, and
stays up, with the local S3 server its gallery's links point at, until Ctrl-C: the run's
page in Prefect's UI is there to look at.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import SecretStr

from prefect_gpt_image.models import ApiLimits, ImageRequest

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


def run_demo(directory: Path, *, verbose: bool = False, ui: bool = False) -> int:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    home = directory / "prefect-home"
    # Before Prefect is imported: a Prefect home of the demo's own means no profile
    # points at another server, and the cache stays with the demo.
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The console shows warnings only, unless `verbose`; the run's logs reach its page in
    # the UI either way (a WARNING logging level would keep them from the API too).
    console_level = "INFO" if verbose else "WARNING"
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", console_level)
    os.environ.pop("PREFECT_API_URL", None)

    print(f"Demo folder: {directory}")
    if not ui:
        return _run(directory, ui_url=None)
    print("Starting a Prefect server for its UI (its first start takes a minute or two)...")
    with _prefect_server(home) as ui_url:
        return _run(directory, ui_url=ui_url)


def _run(directory: Path, *, ui_url: str | None) -> int:
    """Run the prompts and show where the images landed; with `ui_url`, also where its run
    page is, and keep the servers up until Ctrl-C."""
    from prefect_gpt_image._console import print_report, progress_bar
    from prefect_gpt_image.blocks.openai_credentials import OpenAICredentials
    from prefect_gpt_image.errors import RunFailedError
    from prefect_gpt_image.flows.generate_images import generate_images
    from prefect_gpt_image.options import ImageOptions
    from prefect_gpt_image.testing import Fault, GptImageEmulator, LocalS3Server

    bucket_root = directory / "s3"
    prefect = "the Prefect server" if ui_url else "Prefect's embedded server"
    print(f"Starting the API emulator, a local S3 server and {prefect}...")
    with (
        GptImageEmulator(api_key=DEMO_API_KEY, port=_emulator_port(directory), latency=0.3) as api,
        LocalS3Server(bucket_root) as s3,
    ):
        # gpt-image-1.5 shut down on 2026-12-01: the first route answers "model not found",
        # and the run moves to the second, gpt-image-2, after a call or two.
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
                state = generate_images(
                    DEMO_PROMPTS,
                    image=ImageOptions(quality="medium"),
                    bucket=s3.bucket_block(DEMO_BUCKET),
                    prefix=DEMO_PREFIX,
                    credentials=routes,
                    limits=ApiLimits(max_concurrency=4),
                    return_state=True,
                )
            report = state.result()
        except RunFailedError as exc:
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
                f"\n{RETIRED_MODEL} answered 'model not found' {retired_calls} time(s); every "
                f"image came from {SUCCESSOR_MODEL}. For real, this run would have cost "
                f"${report.cost_usd:.2f}: each image's usage at {SUCCESSOR_MODEL}'s token prices."
            )
        print(
            f"This run called the emulator for {report.generated} images and took "
            f"{report.from_cache} from the cache. Run the demo again: every image comes from "
            "the cache, and nothing is paid twice."
        )
        if ui_url:
            run_page = f"{ui_url}/runs/flow-run/{state.state_details.flow_run_id}"
            print(f"\nThe run's page, with its table and gallery, in Prefect's UI:\n  {run_page}")
            print("Press Ctrl-C to stop the servers.", flush=True)
            _wait_for_ctrl_c()
    return 0


@contextlib.contextmanager
def _prefect_server(home: Path) -> Iterator[str]:
    """A real Prefect server in the demo's Prefect home, which this process's flow runs
    report to; yields the UI's URL. Its log is `home/server.log`."""
    from prefect_gpt_image.testing import prefect_server

    with prefect_server(home) as env:
        api_url = env["PREFECT_API_URL"]
        os.environ["PREFECT_API_URL"] = api_url  # Prefect is not imported yet
        yield api_url.removesuffix("/api")


def _wait_for_ctrl_c() -> None:
    """Until Ctrl-C, or SIGTERM, which would otherwise leave the servers behind. Ctrl-C works
    even where the shell started the demo with SIGINT ignored, as a background job."""
    previous = {
        signum: signal.signal(signum, signal.default_int_handler)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nStopping the servers...")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
