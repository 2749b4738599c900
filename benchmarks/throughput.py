"""The flow at scale, beside two references measured in the same run: the sequential
loop users write by hand, and a plain asyncio + httpx + boto3 script with the same
concurrency (the orchestration-free ceiling).

    python3 -m uv run python benchmarks/throughput.py
    python3 -m uv run python benchmarks/throughput.py --only noise

Every run is a process of its own (so that its CPU time and peak RSS are its own), against
the API emulator in another process (latency, rate limit, random 429s and image size set
per scenario), a local `rclone serve s3` and a real `prefect server`. Prints markdown
tables; BENCHMARKS.md keeps the figures. `--quick` runs every scenario smaller, to check
the script itself; `--only` runs some of them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

API_KEY = "bench-key"
BUCKET = "bench"
HERE = Path(__file__).resolve()
SECTIONS = [
    "throughput",
    "overhead",
    "rate-limits",
    "noise",
    "scaling",
    "memory",
    "edit-memory",
    "batch",
    "placements",
]
CAMPAIGN = [
    "meta-feed-square",
    "meta-feed-portrait",
    "meta-reels",
    "meta-link",
    "display-medium-rectangle",
    "display-leaderboard",
]
ASYNCIO_RETRY_SECONDS = 1.0
"""The asyncio script's wait before it retries a 429, outside its slot: what a hand-written
script does."""


# --- one measured run, in a process of its own ------------------------------------------


def child_main(spec: dict[str, Any]) -> None:
    """Run one measured job and print its figures as one JSON line."""
    prompts = [f"{spec['label']} #{n}" for n in range(spec["prompts"])]
    kind = spec["kind"]
    # Imports are paid once per process, not per run: out of the measurement.
    import boto3  # noqa: F401

    if kind == "flow":
        import prefect_aws  # noqa: F401

        import prefect_gpt_image.flows.generate_images  # noqa: F401
    cpu, started = time.process_time(), time.perf_counter()
    extra: dict[str, Any] = {}
    if kind == "sequential":
        sequential_loop(spec, prompts)
    elif kind == "asyncio":
        asyncio_script(spec, prompts)
    else:
        extra = run_flow(spec, prompts)
    figures = {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }
    print(json.dumps(figures), flush=True)


def s3_client(spec: dict[str, Any], pool: int) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=spec["s3_endpoint"],
        aws_access_key_id=spec["s3_access_key"],
        aws_secret_access_key=spec["s3_secret_key"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=pool),
    )


def sequential_loop(spec: dict[str, Any], prompts: list[str]) -> None:
    """The tutorial's loop: one request after another, then the upload."""
    client = s3_client(spec, 1)
    headers = {"x-rapidapi-key": API_KEY, "x-rapidapi-host": spec["api_host"]}
    with httpx.Client(timeout=60) as http:
        for n, prompt in enumerate(prompts):
            answer = http.post(
                spec["api_url"],
                json={"prompt": prompt, "width": 1024, "height": 1024},
                headers=headers,
            )
            answer.raise_for_status()
            data = http.get(answer.json()["url"]).content
            client.put_object(Bucket=BUCKET, Key=f"{spec['prefix']}/{n}.png", Body=data)


def asyncio_script(spec: dict[str, Any], prompts: list[str]) -> None:
    """asyncio + httpx + boto3 (in threads), `concurrency` generations in flight."""
    concurrency = spec["concurrency"]
    client = s3_client(spec, concurrency)
    headers = {"x-rapidapi-key": API_KEY, "x-rapidapi-host": spec["api_host"]}

    async def main() -> None:
        slots = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(
            timeout=60, limits=httpx.Limits(max_connections=4 * concurrency)
        ) as http:

            async def one(n: int, prompt: str) -> None:
                while True:
                    async with slots:
                        answer = await http.post(
                            spec["api_url"],
                            json={"prompt": prompt, "width": 1024, "height": 1024},
                            headers=headers,
                        )
                        if answer.status_code != 429:
                            answer.raise_for_status()
                            data = (await http.get(answer.json()["url"])).content
                            break
                    await asyncio.sleep(ASYNCIO_RETRY_SECONDS)
                await asyncio.to_thread(
                    client.put_object, Bucket=BUCKET, Key=f"{spec['prefix']}/{n}.png", Body=data
                )

            await asyncio.gather(*(one(n, p) for n, p in enumerate(prompts)))

    asyncio.run(main())


def run_flow(spec: dict[str, Any], prompts: list[str]) -> dict[str, Any]:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters
    from pydantic import SecretStr

    from prefect_gpt_image import (
        ApiLimits,
        BatchOptions,
        EditOptions,
        ImageOptions,
        ImageRequest,
        OpenAICredentials,
        RapidAPICredentials,
        generate_images,
    )

    requests: list[str | ImageRequest] = list(prompts)
    credentials: RapidAPICredentials | OpenAICredentials = RapidAPICredentials(
        api_key=SecretStr(API_KEY), base_url=spec["api_base"], model=spec["model"]
    )
    if spec.get("edit_images") or spec.get("openai_model"):  # OpenAI's protocol
        credentials = OpenAICredentials(
            api_key=SecretStr(API_KEY),
            base_url=spec["api_base"] + "/v1",
            model=spec.get("openai_model", "gpt-image-2"),
        )
    bucket = S3Bucket(
        bucket_name=BUCKET,
        credentials=AwsCredentials(
            aws_access_key_id=spec["s3_access_key"],
            aws_secret_access_key=SecretStr(spec["s3_secret_key"]),
            region_name="us-east-1",
            aws_client_parameters=AwsClientParameters(
                endpoint_url=spec["s3_endpoint"], config={"s3": {"addressing_style": "path"}}
            ),
        ),
    )
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        report = generate_images(
            requests,
            bucket=bucket,
            credentials=credentials,
            prefix=spec["prefix"],
            image=ImageOptions(quality=spec.get("quality"), size=spec.get("size", "1024x1024")),
            placements=spec.get("placements", []),
            edit=EditOptions(images=spec.get("edit_images")),
            batch=BatchOptions(enabled=spec.get("mode") == "batch", wait_minutes=60),
            limits=ApiLimits(
                max_concurrency=spec["concurrency"],
                requests_per_second=spec.get("requests_per_second"),
            ),
        )
    return {
        "stored": len(report.images),
        "renditions": sum(image.is_rendition for image in report.images),
        "generated": report.generated,
        "bytes_stored": sum(image.size for image in report.images),
        "cost_usd": report.cost_usd,
        "synchronous_cost_usd": report.synchronous_cost_usd,
    }


# --- the servers, and a run in a child process ------------------------------------------


@dataclass
class Emulator:
    process: subprocess.Popen[str]
    base_url: str

    def stats(self) -> dict[str, int]:
        return dict(httpx.get(f"{self.base_url}/__emulator__/stats").json())

    def reset(self) -> None:
        httpx.post(f"{self.base_url}/__emulator__/reset").raise_for_status()


@contextmanager
def emulator(latency: float, rate_limit: float | None = None, **options: Any) -> Iterator[Emulator]:
    """The emulator in a process of its own. With `fault_rate_429`, that share of requests
    is answered 429 without Retry-After, at random (`fault_seed`), by `serve_emulator`."""
    if options.get("fault_rate_429"):
        noise = {"latency": latency, "rate": options["fault_rate_429"]}
        noise["seed"] = options.get("fault_seed", 0)
        args = [sys.executable, str(HERE), "--emulator", json.dumps(noise)]
    else:
        args = [sys.executable, "-m", "prefect_gpt_image.testing.emulator", "--port", "0"]
        args += ["--api-key", API_KEY, "--latency", str(latency)]
        if rate_limit:
            args += ["--rate-limit", str(rate_limit)]
        if options.get("image_bytes"):
            args += ["--image-bytes", str(options["image_bytes"])]
        if options.get("no_rate_limit_headers"):
            args += ["--no-rate-limit-headers"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield Emulator(process, process.stdout.readline().strip())
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


def serve_emulator(noise: dict[str, Any]) -> None:
    """Serve the emulator until SIGTERM, a `noise["rate"]` share of its answers a 429
    without Retry-After, at random: a busy API, not a limit. The emulator's command line
    has no flag for random faults, and `reset()` clears them, so they are seeded again at
    every reset."""
    from prefect_gpt_image.testing import Fault, GptImageEmulator

    faults = [Fault.rate_limited(retry_after=None)]

    class NoisyEmulator(GptImageEmulator):
        def reset(self) -> None:
            super().reset()
            self.seed_faults(noise["rate"], faults, noise["seed"])

    api = NoisyEmulator(api_key=API_KEY, latency=noise["latency"], keep_images=False)
    api.seed_faults(noise["rate"], faults, noise["seed"])
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    with api:
        print(api.base_url, flush=True)
        stopped.wait()


@dataclass
class Bench:
    env: dict[str, str]
    s3: Any
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    baseline: str | None = None
    """Another checkout's interpreter (its `.venv/bin/python`), whose flow `overhead` also
    measures, in the same rounds: a change's cost, beside the same references."""

    def run(
        self,
        api: Emulator,
        kind: str,
        prompts: int,
        log_level: str = "WARNING",
        python: str = sys.executable,
        **spec: Any,
    ) -> dict[str, Any]:
        """One measured job in a fresh process of `python`, with Prefect logging at
        `log_level`; its figures and the emulator's counts."""
        spec = {
            "kind": kind,
            "prompts": prompts,
            "label": f"a benchmarked bison ({spec.get('model', kind)}, {self.run_id})",
            "prefix": f"{kind}-{uuid.uuid4().hex[:6]}",
            "concurrency": 16,
            "model": f"bench-{self.run_id}",
            "api_base": api.base_url,
            "api_url": api.base_url + "/generate",
            "api_host": "gpt-image-1-5.p.rapidapi.com",
            "s3_endpoint": self.s3.endpoint_url,
            "s3_access_key": self.s3.access_key,
            "s3_secret_key": self.s3.secret_key,
            **spec,
        }
        api.reset()
        wait_until_quiet()
        out = subprocess.run(
            [python, str(HERE), "--child", json.dumps(spec)],
            env={**self.env, "PREFECT_LOGGING_LEVEL": log_level},
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{kind} run failed:\n{out.stderr[-4000:]}")
        figures = dict(json.loads(out.stdout.strip().splitlines()[-1]))
        figures.update(api.stats(), prompts=prompts, rate=prompts / figures["seconds"])
        return figures


def wait_until_quiet(busy_below: float = 0.1, timeout: float = 120.0) -> None:
    """Wait until the machine is idle: the server records a run's task-run events for a
    while after it ends, and a run measured meanwhile shares the CPUs with it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = _cpu_ticks()
        time.sleep(1.0)
        after = _cpu_ticks()
        busy, total = after[0] - before[0], after[1] - before[1]
        if not total or busy / total < busy_below:  # no figures: do not wait
            return


def _cpu_ticks() -> tuple[int, int]:
    """The machine's (busy, total) CPU ticks, from /proc/stat."""
    stat = Path("/proc/stat")
    if not stat.exists():  # not Linux: nothing to wait for
        return 0, 0
    fields = [int(v) for v in stat.read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


# --- the scenarios ----------------------------------------------------------------------


def throughput(bench: Bench, n: int, latency: float, sequential_n: int) -> list[str]:
    ideal = 16 / latency
    with emulator(latency) as api:
        seq = bench.run(api, "sequential", sequential_n)
        ceiling = bench.run(api, "asyncio", n)
        first = bench.run(api, "flow", n, model=f"bench-throughput-{bench.run_id}", prefix="tp")
        again = bench.run(api, "flow", n, model=f"bench-throughput-{bench.run_id}", prefix="tp")
    rows = [
        ("sequential loop (tutorial)", seq),
        ("asyncio + httpx + boto3, 16 in flight", ceiling),
        ("generate_images, max_concurrency=16", first),
        ("generate_images again (cached)", again),
    ]
    lines = [
        f"### Throughput: {n} prompts, latency {latency:g} s, concurrency 16 "
        f"(ideal {ideal:.0f} images/s)",
        "",
        "| run | images | wall s | images/s | of ideal | vs sequential | CPU ms/image "
        "| API calls | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['prompts']} | {r['seconds']:.1f} | {r['rate']:.2f} | "
            f"{r['rate'] / ideal:.0%} | {r['rate'] / seq['rate']:.1f}x | "
            f"{1000 * r['cpu_seconds'] / r['prompts']:.1f} | {r['calls']} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        f"- the flow: **{first['rate'] / ideal:.0%} of ideal**, "
        f"**{first['rate'] / seq['rate']:.1f}x the sequential loop**, "
        f"{first['rate'] / ceiling['rate']:.0%} of the asyncio ceiling",
        f"- cached re-run: **{again['calls']} API calls, "
        f"{again['seconds'] / first['seconds']:.0%} of the first run's wall time**",
    ]
    return lines


def overhead(bench: Bench, n: int, rounds: int) -> list[str]:
    """CPU per image at zero latency: rounds of the script and the flow, alternating, so
    that the medians compare runs made under the same conditions."""
    script: list[dict[str, Any]] = []
    flows: list[dict[str, Any]] = []
    logging: list[dict[str, Any]] = []
    baseline: list[dict[str, Any]] = []
    with emulator(0.0) as api:
        for n_round in range(rounds):
            script.append(bench.run(api, "asyncio", n))
            model = f"bench-overhead-{bench.run_id}-{n_round}"
            flows.append(bench.run(api, "flow", n, model=model))
            logging.append(bench.run(api, "flow", n, model=f"{model}-info", log_level="INFO"))
            if bench.baseline:
                baseline.append(
                    bench.run(api, "flow", n, python=bench.baseline, model=f"{model}-base")
                )
    rows = [
        ("asyncio + httpx + boto3", script),
        ("generate_images", flows),
        ("generate_images, Prefect logs at INFO", logging),
    ]
    if baseline:
        rows.append(("generate_images, the baseline's code", baseline))
    lines = [
        f"### Overhead: {n} prompts at zero latency, concurrency 16, {rounds} rounds",
        "",
        "| run | wall s | images/s | CPU ms/image, each round | median CPU ms/image |",
        "|---|---:|---:|---|---:|",
    ]
    medians = []
    for name, runs in rows:
        per_image = [1000 * r["cpu_seconds"] / n for r in runs]
        medians.append(statistics.median(per_image))
        lines.append(
            f"| {name} | {statistics.median(r['seconds'] for r in runs):.1f} "
            f"| {statistics.median(r['rate'] for r in runs):.1f} "
            f"| {', '.join(f'{v:.1f}' for v in per_image)} | {medians[-1]:.1f} |"
        )
    lines += [
        "",
        f"- the flow's CPU per image: **{medians[1] / medians[0]:.1f}x the script's**; "
        f"{medians[2] / medians[0]:.1f}x with two log lines an image sent to the server",
    ]
    if baseline:
        lines.append(
            f"- the baseline's flow: {medians[3] / medians[0]:.1f}x the script's; this code's "
            f"CPU per image is **{medians[1] / medians[3]:.2f}x the baseline's**"
        )
    return lines


def rate_limits(bench: Bench, n: int, limit: float) -> list[str]:
    lines = [
        f"### Rate limits: {n} prompts, latency 1 s, concurrency 16, the API allows "
        f"{limit:g} requests/s",
        "",
        "| flow | images/s | of the limit | 429s | of requests |",
        "|---|---:|---:|---:|---:|",
    ]
    cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        (f"told requests_per_second={limit:g}", {"requests_per_second": limit}, {}),
        ("not told; learns from 429s and x-ratelimit-* headers", {}, {}),
        ("not told; learns from 429s alone (no headers)", {}, {"no_rate_limit_headers": True}),
    ]
    for n_case, (name, spec, options) in enumerate(cases):
        with emulator(1.0, rate_limit=limit, **options) as api:
            r = bench.run(api, "flow", n, model=f"bench-rate-{n_case}-{bench.run_id}", **spec)
        lines.append(
            f"| {name} | {r['rate']:.2f} | {r['rate'] / limit:.0%} | {r['rate_limited']} | "
            f"{r['rate_limited'] / max(r['calls'], 1):.1%} |"
        )
    return lines


def noise(bench: Bench, n: int, rate: float, rounds: int) -> list[str]:
    """A busy API: a `rate` share of requests refused with a bare 429 at random, no limit
    behind them. Rounds alternate the three runs, each round with faults of its own seed,
    the same for the three."""
    latency, ideal = 1.0, 16.0
    cases: list[tuple[str, str, dict[str, Any]]] = [
        (
            f"asyncio + httpx + boto3, 16 in flight, 429 retried after {ASYNCIO_RETRY_SECONDS:g} s",
            "asyncio",
            {},
        ),
        ("generate_images, max_concurrency=16, rate learned", "flow", {}),
        (
            "generate_images, max_concurrency=16, told requests_per_second=16",
            "flow",
            {"requests_per_second": 16},
        ),
    ]
    runs: list[list[dict[str, Any]]] = [[] for _ in cases]
    for n_round in range(rounds):
        with emulator(latency, fault_rate_429=rate, fault_seed=n_round) as api:
            for n_case, (_, kind, spec) in enumerate(cases):
                model = f"bench-noise-{n_case}-{n_round}-{bench.run_id}"
                runs[n_case].append(bench.run(api, kind, n, model=model, **spec))
    lines = [
        f"### Noise: {n} prompts, latency {latency:g} s, concurrency 16, {rate:.0%} of requests "
        f"answered a bare 429 at random, {rounds} rounds (ideal {ideal:.0f} images/s)",
        "",
        "| run | images/s, each round | median images/s | of ideal | 429s, median | of requests |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (name, _, _), results in zip(cases, runs, strict=True):
        rates = [r["rate"] for r in results]
        median = statistics.median(rates)
        refused = statistics.median(r["calls"] - r["billed"] for r in results)
        share = statistics.median((r["calls"] - r["billed"]) / max(r["calls"], 1) for r in results)
        lines.append(
            f"| {name} | {', '.join(f'{v:.2f}' for v in rates)} | {median:.2f} | "
            f"{median / ideal:.0%} | {refused:g} | {share:.1%} |"
        )
    return lines


def memory(bench: Bench, sizes: list[int], image_bytes: int) -> list[str]:
    """Peak RSS by prompt count, and with small images for the same count: what grows
    with the prompts, and what grows with the bytes."""
    lines = [
        "### Memory: latency 0.2 s, concurrency 16",
        "",
        "| prompts | image size | wall s | images/s | bytes stored | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    runs = [(n, image_bytes) for n in sizes] + [(sizes[-1], 0)]
    for n, padded_to in runs:
        with emulator(0.2, image_bytes=padded_to) as api:
            r = bench.run(api, "flow", n, model=f"bench-memory-{n}-{padded_to}-{bench.run_id}")
        size = f"{r['bytes_stored'] / n / 1e6:.2f} MB"
        lines.append(
            f"| {n} | {size} | {r['seconds']:.1f} | {r['rate']:.1f} | "
            f"{r['bytes_stored'] / 1e9:.2f} GB | {r['peak_rss_mb']:.0f} |"
        )
    return lines


def edit_memory(bench: Bench, photos: int, photo_bytes: int) -> list[str]:
    """Peak RSS of an edit run over `photos` product photos of `photo_bytes` each, beside
    the same run over small photos: an input is read when its request is sent, so
    memory should not grow with the photos' bytes."""
    lines = [
        f"### Edit memory: {photos} photos edited with one prompt, latency 0.2 s, concurrency 16",
        "",
        "| photo size | photos read | wall s | edits/s | peak RSS MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    from PIL import Image

    from prefect_gpt_image.testing.emulator import _pad_png

    for size in (photo_bytes, 0):
        folder = Path(tempfile.mkdtemp(prefix="gpt-image-photos-"))
        try:
            for n in range(photos):
                buffer = io.BytesIO()
                Image.new("RGB", (256, 256), (n % 256, n // 256, 99)).save(buffer, "PNG")
                (folder / f"photo-{n:04d}.png").write_bytes(_pad_png(buffer.getvalue(), size))
            read = sum(p.stat().st_size for p in folder.iterdir())
            with emulator(0.2) as api:
                model = f"bench-edit-memory-{size}-{bench.run_id}"
                r = bench.run(api, "flow", 1, model=model, edit_images=str(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        lines.append(
            f"| {read / photos / 1e6:.2f} MB | {read / 1e9:.2f} GB | {r['seconds']:.1f} | "
            f"{photos / r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return lines


def batch_api(bench: Bench, n: int, image_bytes: int) -> list[str]:
    """The Batch API path: `n` prompts at gpt-image-1.5's medium quality sent as one batch,
    then collected and stored; the dollars per 1,000 images it was billed, beside each
    synchronous route's price, and the peak RSS of the run, which reads the output file
    (`n` base64 images of `image_bytes`) a line at a time."""
    from pydantic import SecretStr

    from prefect_gpt_image import RapidAPICredentials
    from prefect_gpt_image._billing import batch_price
    from prefect_gpt_image.model_table import MODELS

    with emulator(0.0, image_bytes=image_bytes) as api:
        r = bench.run(api, "flow", n, openai_model="gpt-image-1.5", quality="medium", mode="batch")
    assert r["stored"] == n and r["calls"] == 0, r
    rapidapi = RapidAPICredentials(api_key=SecretStr(API_KEY)).model_spec()
    lines = [
        f"### The Batch API: {n} prompts, gpt-image-1.5 at medium quality, 1024x1024, "
        f"images of {image_bytes / 1e6:g} MB",
        "",
        "| route | $ per 1,000 images |",
        "|---|---:|",
        f"| RapidAPI (flat) | {1000 * (rapidapi.flat_price_usd or 0):.2f} |",
    ]
    for model in ("gpt-image-1.5", "gpt-image-2"):
        price = MODELS[model].price_per_image("medium", 1024, 1024) or 0.0
        lines.append(f"| OpenAI {model}, synchronous | {1000 * price:.2f} |")
        lines.append(f"| OpenAI {model}, Batch API | {batch_price(1000 * price):.2f} |")
    lines += [
        "",
        f"Measured: the run was billed ${1000 * r['cost_usd'] / n:.2f} per 1,000 images "
        f"(${1000 * r['synchronous_cost_usd'] / n:.2f} synchronously), by the emulator's usage; "
        f"{r['batches_created']} batch, {r['calls']} synchronous calls, {r['stored']} images "
        f"({r['bytes_stored'] / 1e9:.2f} GB) stored in {r['seconds']:.1f} s; peak RSS "
        f"**{r['peak_rss_mb']:.0f} MB**.",
    ]
    return lines


def placements(bench: Bench, n: int, rounds: int, latency: float) -> list[str]:
    """`n` prompts delivered at six placements (`CAMPAIGN`, cropped from 1536x1024 masters),
    beside the same run without placements, in turns: what drawing and storing the
    renditions adds to a run's time, CPU and memory."""
    runs: dict[str, list[dict[str, Any]]] = {"without placements": [], "6 placements": []}
    with emulator(latency) as api:
        for turn in range(rounds):
            for name, chosen in (("without placements", []), ("6 placements", CAMPAIGN)):
                model = f"bench-placements-{len(chosen)}-{turn}-{bench.run_id}"
                r = bench.run(api, "flow", n, model=model, size="1536x1024", placements=chosen)
                assert r["renditions"] == n * len(chosen) and r["billed"] == n, r
                runs[name].append(r)
    lines = [
        f"### Placements: {n} prompts, latency {latency:g} s, concurrency 16, masters of "
        "1536x1024, "
        f"medians of {rounds} turns",
        "",
        "| run | objects stored | wall s | CPU s | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    medians = {}
    for name, results in runs.items():
        wall, cpu, rss = (
            statistics.median(r[figure] for r in results)
            for figure in ("seconds", "cpu_seconds", "peak_rss_mb")
        )
        medians[name] = (wall, cpu, rss)
        lines.append(f"| {name} | {results[0]['stored']} | {wall:.1f} | {cpu:.1f} | {rss:.0f} |")
    (wall, cpu, rss), (base_wall, base_cpu, base_rss) = (
        medians["6 placements"],
        medians["without placements"],
    )
    lines += [
        "",
        f"With placements, the run takes {wall / base_wall:.2f}x the time, {cpu / base_cpu:.2f}x "
        f"the CPU and {rss / base_rss:.2f}x the memory of the same run without them "
        f"({(cpu - base_cpu) / (n * len(CAMPAIGN)) * 1000:.0f} ms of CPU a rendition).",
    ]
    return lines


def scaling(bench: Bench, limit: float, levels: list[int]) -> list[str]:
    lines = [
        f"### Scaling: latency 1 s, the API allows {limit:g} requests/s, the flow is told so",
        "",
        "| max_concurrency | prompts | images/s | ideal min(C/latency, limit) | of ideal |",
        "|---:|---:|---:|---:|---:|",
    ]
    with emulator(1.0, rate_limit=limit) as api:
        for c in levels:
            ideal = min(c, limit)
            n = int(20 * ideal)
            r = bench.run(
                api,
                "flow",
                n,
                concurrency=c,
                requests_per_second=limit,
                model=f"bench-scale-{c}-{bench.run_id}",
            )
            lines.append(f"| {c} | {n} | {r['rate']:.2f} | {ideal:g} | {r['rate'] / ideal:.0%} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--emulator", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="every scenario, smaller")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="run only these scenarios")
    parser.add_argument(
        "--baseline",
        metavar="PYTHON",
        help="another checkout's .venv/bin/python, whose flow overhead measures too",
    )
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return 0
    if args.emulator:
        serve_emulator(json.loads(args.emulator))
        return 0

    from prefect_gpt_image.testing import LocalS3Server, prefect_server

    quick = args.quick
    chosen = set(args.only or SECTIONS)
    work = Path(tempfile.mkdtemp(prefix="gpt-image-bench-"))
    print(f"{os.cpu_count()} CPUs; every run a process of its own", flush=True)

    def show(lines: list[str]) -> None:  # as each ends: a later failure keeps the earlier
        print("\n" + "\n".join(lines), flush=True)

    try:
        with LocalS3Server(work / "s3") as s3, prefect_server(work / "prefect-home") as env:
            s3.create_bucket(BUCKET)
            env.update(PREFECT_LOCAL_STORAGE_PATH=str(work / "results"))
            bench = Bench(env, s3, baseline=args.baseline)
            if "throughput" in chosen:
                show(throughput(bench, 60 if quick else 500, 1.0, 5 if quick else 30))
            if "overhead" in chosen:
                show(overhead(bench, 60 if quick else 500, 2 if quick else 5))
            if "rate-limits" in chosen:
                show(rate_limits(bench, 40 if quick else 500, 8))
            if "noise" in chosen:
                show(noise(bench, 60 if quick else 500, 0.02, 1 if quick else 3))
            if "scaling" in chosen:
                show(scaling(bench, 24, [4, 16] if quick else [2, 4, 8, 16, 32, 64]))
            if "memory" in chosen:
                show(memory(bench, [50, 200] if quick else [500, 5000], 1_000_000))
            if "edit-memory" in chosen:
                show(edit_memory(bench, 40 if quick else 500, 10_000_000))
            if "batch" in chosen:
                show(batch_api(bench, 100 if quick else 1000, 1_000_000))
            if "placements" in chosen:
                show(placements(bench, 40 if quick else 500, 1 if quick else 3, 2.0))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
