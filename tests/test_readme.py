"""Every ```python example of README.md, run as a user runs it, so that one that stops working
fails the suite.

Each example runs against the real local parts: the API emulator (RapidAPI's protocol at
`api.base_url`, OpenAI's at `api.openai_base_url`), `rclone serve s3`, Prefect's test harness,
and, for the Dask example, a `LocalCluster` and a `redis-server`. Before each example, the
blocks it names are saved, pointing at them, and the objects and files it reads are put in
place (`readme_blocks`, `readme_world`).

The real providers cannot run here, so the README's literal endpoints, keys and addresses are
rewritten, and only those, through `SUBSTITUTIONS` below: each entry is a literal of the README
and what it becomes. Nothing else in an example is changed, except that the value of its last
expression is kept (`_result`), as an interactive session shows it, for the checks to read.

Each example has a check in `CHECKS` that asserts what its user relies on (images in the
bucket, calls at the emulator, the report, the saved block); an example with no check fails,
and the only example not run as written is the side-by-side "Before / Now" comparison, whose
two columns are checked against the flow's signature instead (`test_the_before_and_now_...`).
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import functools
import io
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ParameterBindError
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL
from prefect.utilities.callables import get_call_parameters
from prefect_aws import S3Bucket
from prefect_events import paused_flow_runs

# The Dask example's Redis: the `redis_url` fixture of the tests of the locks, a real redis-server.
from test_redis_locks import redis_url  # noqa: F401

import prefect_gpt_image
from prefect_gpt_image import (
    ImageOptions,
    OpenAICredentials,
    PromptTemplate,
    RapidAPICredentials,
    RunReport,
    generate_images,
)
from prefect_gpt_image.model_table import MODELS
from prefect_gpt_image.testing import GptImageEmulator, LocalS3Server

README = Path(__file__).resolve().parents[1] / "README.md"

SUBSTITUTIONS = {
    # the README's literal -> the name, in the example's namespace, of what stands in for it
    'api_key="YOUR-RAPIDAPI-KEY"': "api_key=API_KEY, base_url=RAPIDAPI_URL",
    'api_key="YOUR-OPENAI-KEY"': "api_key=API_KEY, base_url=OPENAI_URL",
    'api_key="YOUR-GATEWAY-KEY"': "api_key=API_KEY",
    '"https://llm-gateway.example.com/v1"': "OPENAI_URL",
    '"https://gateway.example.com/v1"': "OPENAI_URL",
    '"tcp://scheduler:8786"': "DASK_SCHEDULER",
    '"redis://redis.internal:6379/0"': "REDIS_URL",
}


BEFORE_AND_NOW = "# Before"
"""The first line of the side-by-side comparison of the old call and the new."""


@dataclass(frozen=True)
class Example:
    index: int
    line: int
    code: str

    @property
    def first_line(self) -> str:
        return self.code.strip().splitlines()[0]

    def __str__(self) -> str:
        return f"{self.index}-line{self.line}-{self.first_line[:40]}"


def readme_examples() -> list[Example]:
    text = README.read_text(encoding="utf-8")
    found = []
    for match in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M):
        indent = len(match.group(1))
        lines = [line[indent:] for line in match.group(2).splitlines()]
        line = text[: match.start(2)].count("\n") + 1
        found.append(Example(len(found), line, "\n".join(lines) + "\n"))
    return found


EXAMPLES = readme_examples()
RUNNABLE = [example for example in EXAMPLES if not example.first_line.startswith(BEFORE_AND_NOW)]


def substituted(code: str) -> str:
    for literal, replacement in SUBSTITUTIONS.items():
        code = code.replace(literal, replacement)
    return code


def compiled(example: Example) -> Any:
    """The example's code, its lines numbered as in README.md, its last expression kept."""
    tree = ast.parse(substituted(example.code), filename=str(README))
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr):
        keep = ast.Assign(targets=[ast.Name("_result", ast.Store())], value=last.value)
        tree.body[-1] = ast.copy_location(keep, last)
    ast.fix_missing_locations(tree)
    ast.increment_lineno(tree, example.line - 1)
    return compile(tree, str(README), "exec")


def png(width: int = 64, height: int = 64, alpha: bool = False, colour: int = 90) -> bytes:
    image = Image.new(
        "RGBA" if alpha else "RGB", (width, height), (colour, 120, 200, 0)[: 4 if alpha else 3]
    )
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# -- the world the README assumes ------------------------------------------------------------


@dataclass
class World:
    api: GptImageEmulator
    s3: LocalS3Server
    namespace: dict[str, Any]
    blocks: dict[str, Callable[[], Block]]
    replaced: list[str] = dataclasses.field(default_factory=list)

    @functools.cached_property
    def client(self) -> Any:
        return self.s3.boto3_client()

    def keys(self, bucket: str, prefix: str = "") -> set[str]:
        listing = self.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return {item["Key"] for item in listing.get("Contents", [])}

    def assert_stored(self, report: RunReport, count: int) -> None:
        assert isinstance(report, RunReport), report
        assert (len(report.images), report.failures) == (count, []), report.summary()
        stored = self.keys("my-creatives")
        for image in report.images:
            assert image.bucket == "my-creatives" and image.key in stored, image.uri

    def put(self, uri: str, data: bytes) -> None:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        self.s3.create_bucket(bucket)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)


SPRING_PROMPTS = ["a spring tulip in a vase", "a picnic basket on fresh grass"]
THIS_WEEK_PROMPTS = ["a linen shirt on a hanger", "a straw hat on a beach towel"]


@pytest.fixture(scope="module")
def readme_blocks(
    emulator: GptImageEmulator, s3_server: LocalS3Server, api_key: str
) -> dict[str, Callable[[], Block]]:
    """The blocks the README names, saved once, pointing at the emulator and the S3 server;
    the routes' models are this module's own, so that nothing comes from another test's cache."""
    unique = uuid.uuid4().hex[:8]
    aws = s3_server.aws_credentials
    s3_server.create_bucket("my-creatives")
    openai_model = f"gpt-image-2-test-{unique}"  # described as gpt-image-2, as in conftest
    blocks: dict[str, Callable[[], Block]] = {
        "my-aws": aws,
        "creatives-bucket": lambda: S3Bucket(
            bucket_name="my-creatives", bucket_folder="generated", credentials=aws()
        ),
        "gpt-image-cache": lambda: s3_server.bucket_block("gpt-image-cache"),
        "gpt-image-credentials": lambda: RapidAPICredentials(
            api_key=api_key, base_url=emulator.base_url, model=f"gpt-image-test-{unique}"
        ),
        "openai-gpt-image": lambda: OpenAICredentials(
            api_key=api_key,
            base_url=emulator.openai_base_url,
            model=openai_model,
            models={openai_model: MODELS["gpt-image-2"]},
        ),
        "gateway-gpt-image": lambda: OpenAICredentials(
            api_key=api_key,
            base_url=emulator.openai_base_url,
            model="image-gen",
            model_aliases={"image-gen": "gpt-image-2"},
        ),
    }
    for name, block in blocks.items():
        block().save(name, overwrite=True)
    return blocks


@pytest.fixture
def readme_world(
    api: GptImageEmulator,
    readme_blocks: dict[str, Callable[[], Block]],
    s3_server: LocalS3Server,
    api_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[World]:
    """What a reader of the README has by the time an example runs: its blocks saved, its
    buckets, prompt files and photos in place, the AWS_* environment for other buckets."""
    for name in ("openai-gpt-image", "gateway-gpt-image"):  # the emulator serves their models
        api.models[cast(OpenAICredentials, readme_blocks[name]()).model] = None

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    world = World(api, s3_server, {}, readme_blocks)
    unique = uuid.uuid4().hex[:8]  # prompts of this test's own: nothing comes from a cache
    spring = [f"{prompt} {unique}" for prompt in SPRING_PROMPTS]
    this_week = [f"{prompt} {unique}" for prompt in THIS_WEEK_PROMPTS]
    world.put("s3://my-creatives/prompts/spring.txt", "\n".join(spring).encode())
    world.put("s3://my-creatives/prompts/this-week.txt", "\n".join(this_week).encode())
    world.put("s3://my-creatives/prompts/campaign.txt", "\n".join(spring).encode())
    world.put("s3://creatives/products/mug.png", png(colour=10))
    world.put("s3://creatives/products/vase.png", png(colour=200))
    world.put("s3://creatives/briefs/shots/cup.png", png(colour=60))
    world.put(
        "s3://creatives/briefs/spring.csv",
        (
            "prompt,image\n"
            f"the mug on a spring picnic {unique},s3://creatives/products/mug.png\n"
            f"the cup in a spring garden {unique},shots/cup.png\n"
        ).encode(),
    )
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "table.png").write_bytes(png(colour=30))
    (tmp_path / "photos" / "cup-area.png").write_bytes(png(alpha=True))
    monkeypatch.chdir(tmp_path)

    # An example without imports continues an earlier one: the package's names are imported.
    world.namespace.update(
        {name: getattr(prefect_gpt_image, name) for name in prefect_gpt_image.__all__}
    )
    world.namespace.update(
        API_KEY=api_key,
        RAPIDAPI_URL=api.base_url,
        OPENAI_URL=api.openai_base_url,
        tmp_path=tmp_path / "example-s3",  # the README's testing example is a pytest test
        __name__="readme_example",
        _spring=spring,
        _this_week=this_week,
        _unique=unique,
    )
    yield world
    for name in world.replaced:  # an example saved its own: the next one finds the README's
        readme_blocks[name]().save(name, overwrite=True)


# -- what each example's user relies on ------------------------------------------------------


def saves_the_blocks(world: World, output: str) -> None:
    rapid = RapidAPICredentials.load("gpt-image-credentials")
    openai = OpenAICredentials.load("openai-gpt-image")
    assert rapid.base_url == world.api.base_url and openai.base_url == world.api.openai_base_url
    assert openai.model == "gpt-image-2"
    bucket = S3Bucket.load("creatives-bucket")
    assert (bucket.bucket_name, bucket.bucket_folder) == ("my-creatives", "generated")
    bucket.write_path("probe.txt", b"saved")  # the loaded AwsCredentials reach the bucket
    assert "generated/probe.txt" in world.keys("my-creatives", "generated/")
    assert world.api.calls == []


def saves_a_gateway_alias(world: World, output: str) -> None:
    block = OpenAICredentials.load("gateway-gpt-image")
    assert (block.model, block.model_aliases) == ("image-gen", {"image-gen": "gpt-image-2"})
    report = generate_images(
        [f"a gateway teapot {world.namespace['_unique']}"],
        bucket="creatives-bucket",
        credentials="gateway-gpt-image",
    )
    world.assert_stored(report, 1)
    # the gateway's name is what is sent and recorded; the price is gpt-image-2's
    assert [call.model for call in world.api.calls] == ["image-gen"]
    assert report.images[0].model == "image-gen" and report.cost_usd > 0


def falls_back_over_routes(world: World, output: str) -> None:
    report = world.namespace["_result"]
    world.assert_stored(report, len(world.namespace["_spring"]))
    assert {image.route for image in report.images} == {"gpt-image-credentials"}
    assert len(world.api.calls) == len(world.namespace["_spring"])


def overrides_a_model_entry(world: World, output: str) -> None:
    block = OpenAICredentials.load("gateway-gpt-image")
    assert block.base_url == world.api.openai_base_url
    assert block.models["gpt-image-2"].input_fidelity is True


def describes_a_new_model(world: World, output: str) -> None:
    block = OpenAICredentials.load("openai-gpt-image")
    assert block.model == "gpt-image-3" and "gpt-image-3" in block.models
    assert block.models["gpt-image-3"].token_prices.image_output == 30


def generates_a_list(world: World, output: str) -> None:
    report = world.namespace["report"]
    world.assert_stored(report, 4)
    # what the example says it prints, in its comments ("...." stands for the run's own part)
    said = re.findall(r"^print\(.*\)  # (.*)$", world.namespace["_example"], re.M)
    printed = output.splitlines()
    assert len(said) == len(printed) == 2
    for line, comment in zip(printed, said, strict=True):
        assert re.fullmatch(re.escape(comment).replace(re.escape("...."), ".+"), line), line
    variants = [image for image in report.images if image.name == "shoes-hero"]
    assert len(variants) == 3 and {(i.width, i.height) for i in variants} == {(1536, 1024)}
    assert {image.route for image in report.images} == {"openai-gpt-image"}


def generates_a_template(world: World, output: str) -> None:
    report = world.namespace["_result"]
    world.assert_stored(report, 4)
    names = sorted(Path(image.key).name.rsplit("-", 1)[0] for image in report.images)
    assert names == ["mug-marble-studio", "mug-oak-studio", "vase-marble-studio", "vase-oak-studio"]


def edits_products(world: World, output: str) -> None:
    report = world.namespace["report"]
    world.assert_stored(report, 4)  # two prompts times two product photos
    edits = [call for call in world.api.calls if call.path.endswith("/images/edits")]
    assert len(edits) == 5 and all(call.status == 200 for call in edits)
    masked = [call for call in edits if call.mask is not None]
    assert len(masked) == 1 and masked[0].prompt == "a lit candle"
    assert world.namespace["image"].media_type == "image/png"


def delivers_a_campaign(world: World, output: str) -> None:
    report = world.namespace["report"]
    world.assert_stored(report, 2 + 2 * 7)  # two masters, each in seven placements
    assert world.api.billed == 2 and report.generated == 2
    hero = [image for image in report.images if image.placement == "newsletter-hero"]
    assert [(image.width, image.height) for image in hero] == [(1200, 400)] * 2
    assert all(image.size <= 200_000 for image in hero)


def publishes_what_was_approved(world: World, output: str) -> None:
    report = world.namespace["report"]
    world.assert_stored(report, 2 + 2 * 2)  # two masters, each in two placements
    published = world.keys("my-creatives", "generated/spring/published/")
    assert {key.rsplit("/", 1)[-1] for key in published} == {i.file_name for i in report.images}
    assert world.api.billed == 2


class Reviewer:
    """A person who approves every image of the next run that waits for review: the
    review example waits for a decision, which comes from this thread, through Prefect."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._approve, daemon=True)
        self.thread.start()

    def _approve(self) -> None:
        with get_client(sync_client=True) as client:
            while not self.stop.wait(0.3):
                for flow_run in paused_flow_runs():
                    try:
                        client.read_flow_run_input(flow_run.id, "paused-review-1-0-schema")
                    except Exception:  # not waiting for its review yet
                        continue
                    resume_flow_run(flow_run.id, run_input={"approve_all": True})
                    return

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def edits_from_a_prompt_file(world: World, output: str) -> None:
    report = world.namespace["_result"]
    world.assert_stored(report, 2)
    edits = [call for call in world.api.calls if call.path.endswith("/images/edits")]
    assert len(edits) == 2 and all(len(call.inputs) == 1 for call in edits)


def sends_a_batch(world: World, output: str) -> None:
    report = world.namespace["report"]
    assert isinstance(report, RunReport) and report.failures == []
    assert len(report.waiting) == len(world.namespace["_this_week"])
    assert len(world.api.batches) == 1 and world.api.calls == []


def maps_in_your_own_flow(world: World, output: str) -> None:
    prompts = [f"a mapped mug {world.namespace['_unique']}", "a mapped vase"]
    stored = world.namespace["my_flow"](prompts)
    assert len(stored) == 2 and all(image.key.startswith("generated/mine/") for image in stored)
    assert {image.key for image in stored} <= world.keys("my-creatives", "generated/mine/")
    assert world.api.billed == 2


def awaits_the_twins(world: World, output: str) -> None:
    prompts = [f"an awaited mug {world.namespace['_unique']}", "an awaited vase"]
    stored = asyncio.run(world.namespace["my_async_flow"](prompts))
    assert len(stored) == 2 and all(image.key.startswith("generated/mine/") for image in stored)
    assert {image.key for image in stored} <= world.keys("my-creatives", "generated/mine/")
    assert world.api.billed == 2


def runs_on_dask(world: World, output: str) -> None:
    report = world.namespace["_result"]
    world.assert_stored(report, len(world.namespace["_spring"]))
    assert world.api.billed == len(world.namespace["_spring"])
    cached = world.keys("gpt-image-cache")  # the cache every worker reaches
    assert len(cached) >= len(world.namespace["_spring"])


def uses_the_emulator_in_a_test(world: World, output: str) -> None:
    report = world.namespace["report"]
    assert isinstance(report, RunReport) and len(report.images) == 1
    assert world.api.calls == []  # the example's own emulator took the calls


CHECKS: dict[str, Callable[[World, str], None]] = {
    # a line only that example has -> its check
    'RapidAPICredentials(api_key="YOUR-RAPIDAPI-KEY").save': saves_the_blocks,
    "model_aliases=": saves_a_gateway_alias,
    'credentials=["gpt-image-credentials", "openai-gpt-image"]': falls_back_over_routes,
    'MODELS["gpt-image-2"].model_copy': overrides_a_model_entry,
    '"gpt-image-3": ModelSpec(': describes_a_new_model,
    'name="shoes-hero"': generates_a_list,
    'template="{product} on a {background} background, {style}"': generates_a_template,
    '"images": "s3://creatives/products/"': edits_products,
    '"s3://creatives/briefs/spring.csv"': edits_from_a_prompt_file,
    'name="newsletter-hero"': delivers_a_campaign,
    "review=ReviewOptions(": publishes_what_was_approved,
    "batch=BatchOptions(wait_minutes=0)": sends_a_batch,
    "def my_flow(": maps_in_your_own_flow,
    "async def my_async_flow(": awaits_the_twins,
    "DaskTaskRunner(": runs_on_dask,
    "GptImageEmulator(api_key=": uses_the_emulator_in_a_test,
}

SCENARIOS = {"DaskTaskRunner("}
"""Examples that start machines of their own: a Dask cluster and a Redis."""


def check_for(example: Example) -> Callable[[World, str], None]:
    matching = [check for marker, check in CHECKS.items() if marker in example.code]
    assert len(matching) == 1, (
        f"README.md example at line {example.line} ({example.first_line!r}) has "
        f"{len(matching)} checks in tests/test_readme.py: give it one, of what its user relies on"
    )
    return matching[0]


def run(example: Example, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    check = check_for(example)
    for name in re.findall(r'\.save\("([^"]+)"\)', example.code):
        type(world.blocks[name]()).delete(name)
        world.replaced.append(name)
    capsys.readouterr()
    world.namespace["_example"] = example.code
    reviewer = Reviewer() if "review=ReviewOptions(" in example.code else None
    try:
        exec(compiled(example), world.namespace)
    finally:
        if reviewer is not None:
            reviewer.close()
    check(world, capsys.readouterr().out)


def params(scenario: bool) -> list[Any]:
    return [
        pytest.param(example, id=str(example))
        for example in RUNNABLE
        if any(marker in example.code for marker in SCENARIOS) == scenario
    ]


# -- the tests -------------------------------------------------------------------------------


def test_the_readme_has_its_examples_and_every_substitution_is_used() -> None:
    assert len(EXAMPLES) >= 14
    for literal in SUBSTITUTIONS:
        assert any(literal in example.code for example in EXAMPLES), (
            f"{literal} is no longer in README.md: drop it from SUBSTITUTIONS"
        )


@pytest.mark.parametrize("example", params(scenario=False))
def test_readme_example(
    example: Example, readme_world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    run(example, readme_world, capsys)


@pytest.fixture
def dask_scheduler(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A Dask cluster of processes; its workers find this session's Prefect server through
    PREFECT_API_URL, as a user's workers do."""
    from distributed import LocalCluster

    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))
    with LocalCluster(
        n_workers=1, processes=True, threads_per_worker=2, dashboard_address=None
    ) as cluster:
        yield str(cluster.scheduler_address)


@pytest.mark.scenario
@pytest.mark.parametrize("example", params(scenario=True))
def test_readme_scenario_example(
    example: Example,
    readme_world: World,
    dask_scheduler: str,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def create_the_rate_limit() -> None:  # `prefect gcl create ... --slot-decay-per-second`
        async with get_client() as client:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(
                    name="rapidapi-gpt-image", limit=5, slot_decay_per_second=5
                )
            )

    asyncio.run(create_the_rate_limit())
    redis = request.getfixturevalue("redis_url")
    readme_world.namespace.update(DASK_SCHEDULER=dask_scheduler, REDIS_URL=redis)
    run(example, readme_world, capsys)


def test_the_before_and_now_columns_are_the_old_call_refused_and_the_new_one_accepted() -> None:
    """The comparison is two calls side by side: the left one must be refused by name, the
    right one bound and validated as the flow's parameters (it names no route: it is not run)."""
    (example,) = [e for e in EXAMPLES if e.first_line.startswith(BEFORE_AND_NOW)]
    lines = example.code.splitlines()
    split = lines[0].index("# Now")
    before = "\n".join(line[:split].rstrip() for line in lines[1:])
    now = "\n".join(line[split:].rstrip() for line in lines[1:])
    bound: dict[str, Any] = {}

    def call(*args: Any, **kwargs: Any) -> None:
        parameters = get_call_parameters(generate_images.fn, args, kwargs)
        bound.update(generate_images.validate_parameters(parameters))

    namespace = {"generate_images": call, "PromptTemplate": PromptTemplate}
    with pytest.raises(ParameterBindError, match="template"):
        exec(before, dict(namespace))
    exec(now, dict(namespace))
    assert isinstance(bound["prompts"], PromptTemplate)
    assert bound["image"] == ImageOptions(size="1536x1024", quality="high")
    assert bound["limits"].max_concurrency == 4 and bound["cache"].refresh is True
    assert bound["batch"].enabled is True and bound["batch"].wait_minutes == 0
    assert bound["links"].public_base_url == "https://cdn.example"
