"""Throughput of the batch flow against the emulator and a local S3 server, beside two
references measured in the same run: the sequential loop users write by hand, and a plain
asyncio + httpx + boto3 script with the same concurrency (the orchestration-free ceiling).

    python3 -m uv run python benchmarks/throughput.py --prompts 500 --latency 1 --concurrency 16

Prints a markdown table; BENCHMARKS.md keeps the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WORK = Path(tempfile.mkdtemp(prefix="gpt-image-bench-"))
os.environ.update(
    PREFECT_HOME=str(WORK / "prefect-home"),
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    DO_NOT_TRACK="1",
    PREFECT_LOGGING_LEVEL="WARNING",
)
os.environ.pop("PREFECT_API_URL", None)

import boto3  # noqa: E402
import httpx  # noqa: E402
from botocore.config import Config  # noqa: E402

from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server  # noqa: E402

API_KEY = "bench-key"


@dataclass
class Result:
    name: str
    images: int
    seconds: float
    cpu_seconds: float
    api_calls: int

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def measure(name: str, api: GptImageEmulator, images: int, run: Callable[[], object]) -> Result:
    api.reset()
    cpu = time.process_time()
    started = time.perf_counter()
    run()
    return Result(
        name, images, time.perf_counter() - started, time.process_time() - cpu, len(api.calls)
    )


def s3_client(s3: LocalS3Server, pool: int) -> object:
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=pool),
    )


def sequential_loop(
    api: GptImageEmulator, s3: LocalS3Server, bucket: str, prompts: list[str]
) -> None:
    """The tutorial's loop: one request after another, then the upload."""
    client = s3_client(s3, 1)
    headers = {"x-rapidapi-key": API_KEY, "x-rapidapi-host": api.api_host}
    with httpx.Client(timeout=60) as http:
        for n, prompt in enumerate(prompts):
            answer = http.post(
                api.url, json={"prompt": prompt, "width": 1024, "height": 1024}, headers=headers
            )
            answer.raise_for_status()
            data = http.get(answer.json()["url"]).content
            client.put_object(Bucket=bucket, Key=f"sequential/{n}.png", Body=data)  # type: ignore[attr-defined]


def asyncio_script(
    api: GptImageEmulator, s3: LocalS3Server, bucket: str, prompts: list[str], concurrency: int
) -> None:
    """asyncio + httpx + boto3 (in threads), `concurrency` generations in flight."""
    client = s3_client(s3, concurrency)
    headers = {"x-rapidapi-key": API_KEY, "x-rapidapi-host": api.api_host}

    async def main() -> None:
        slots = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(
            timeout=60, limits=httpx.Limits(max_connections=4 * concurrency)
        ) as http:

            async def one(n: int, prompt: str) -> None:
                async with slots:
                    answer = await http.post(
                        api.url,
                        json={"prompt": prompt, "width": 1024, "height": 1024},
                        headers=headers,
                    )
                    answer.raise_for_status()
                    data = (await http.get(answer.json()["url"])).content
                await asyncio.to_thread(
                    client.put_object,
                    Bucket=bucket,
                    Key=f"asyncio/{n}.png",
                    Body=data,  # type: ignore[attr-defined]
                )

            await asyncio.gather(*(one(n, p) for n, p in enumerate(prompts)))

    asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--latency", type=float, default=1.0, help="emulator seconds per image")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--sequential-prompts",
        type=int,
        default=30,
        help="the sequential loop runs on this many (its rate is steady)",
    )
    args = parser.parse_args()

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness
    from pydantic import SecretStr

    from prefect_gpt_image import RapidAPICredentials, generate_images

    run = uuid.uuid4().hex[:6]
    prompts = [f"a benchmarked bison #{n} ({run})" for n in range(args.prompts)]
    results: list[Result] = []
    with (
        GptImageEmulator(api_key=API_KEY, latency=args.latency) as api,
        LocalS3Server(WORK / "s3") as s3,
        prefect_test_harness(server_startup_timeout=180),
        temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        s3.create_bucket("bench")
        credentials = RapidAPICredentials(
            api_key=SecretStr(API_KEY), base_url=api.base_url, model=f"bench-{run}"
        )
        bucket = s3.bucket_block("bench")
        few = prompts[: args.sequential_prompts]
        results.append(
            measure(
                "sequential loop (tutorial)",
                api,
                len(few),
                lambda: sequential_loop(api, s3, "bench", few),
            )
        )
        results.append(
            measure(
                f"asyncio + httpx + boto3, {args.concurrency} in flight",
                api,
                len(prompts),
                lambda: asyncio_script(api, s3, "bench", prompts, args.concurrency),
            )
        )

        def flow(prefix: str) -> None:
            generate_images(
                prompts,
                bucket=bucket,
                credentials=credentials,
                prefix=prefix,
                max_concurrency=args.concurrency,
            )

        results.append(
            measure(
                f"generate_images, max_concurrency={args.concurrency}",
                api,
                len(prompts),
                lambda: flow("first"),
            )
        )
        results.append(
            measure("generate_images again (cached)", api, len(prompts), lambda: flow("again"))
        )

    ideal = args.concurrency / args.latency if args.latency else float("nan")
    sequential, ceiling, first, cached = results
    print(
        f"\n{args.prompts} prompts, emulator latency {args.latency:g} s, "
        f"concurrency {args.concurrency}; ideal {ideal:.1f} images/s\n"
    )
    print(
        "| run | images | wall s | images/s | vs ideal | vs sequential | CPU ms/image | API calls |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.name} | {r.images} | {r.seconds:.1f} | {r.rate:.2f} | "
            f"{r.rate / ideal:.0%} | {r.rate / sequential.rate:.1f}x | "
            f"{1000 * r.cpu_seconds / r.images:.1f} | {r.api_calls} |"
        )
    print(
        f"\ncached re-run: {cached.seconds / first.seconds:.0%} of the first run's wall time; "
        f"flow CPU per image {first.cpu_seconds / ceiling.cpu_seconds:.1f}x the asyncio script's"
    )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
