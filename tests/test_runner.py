"""The runner's own rules, one flow run each, against a fake provider in-process.

The real providers cannot run here; their stand-in is `FakeClient`, which a `FakeRoute`
hands the real `generate_image` task, so the task's retries, cache, route book and budget
are the real ones. The bucket is the real local S3. Each test uses a route of its own
(its own endpoint), so no test finds another's images in the generation cache.
"""

from __future__ import annotations

import hashlib
import io
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import pytest
from PIL import Image
from prefect import flow
from prefect_aws import S3Bucket
from pydantic import SecretStr

from prefect_gpt_image import OpenAICredentials
from prefect_gpt_image._artifacts import ProgressArtifact
from prefect_gpt_image._billing import Budget, worst_case_cost
from prefect_gpt_image._ledger import RunLedger
from prefect_gpt_image._runner import Runner
from prefect_gpt_image.errors import (
    AuthenticationError,
    BudgetExceededError,
    GptImageError,
    InvalidResponseError,
)
from prefect_gpt_image.models import ApiLimits, GeneratedImage, ImageRequest, RunReport
from prefect_gpt_image.tasks.generate import generate_image

FOLDER = "runner"


def png_of(prompt: str) -> bytes:
    """A small PNG of its own for each prompt, so each object's bytes say whose they are."""
    colour = tuple(hashlib.sha256(prompt.encode()).digest()[:3])
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeClient:
    """The provider: answers `generate` as `GenerationClient` does, holding each call's
    worst case in the run's budget and charging it, and records every call."""

    def __init__(self, route: OpenAICredentials) -> None:
        self.route = route
        self.calls: list[str] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.hold_until_in_flight = 0
        """Hold each call until this many were in flight at once (or a few seconds passed),
        then a little longer: calls overlap as far as the runner lets them."""
        self.fail: Callable[[ImageRequest, int], GptImageError | None] = lambda request, n: None
        """The error (charged or not) the `n`th call for a request answers, if any."""
        self._lock = threading.Condition()

    def generate(
        self,
        request: ImageRequest,
        limits: ApiLimits | None = None,
        *,
        still_live: Callable[[], bool] | None = None,
        budget: Budget | None = None,
        charged_to: str | None = None,
        input_bucket: S3Bucket | None = None,
    ) -> GeneratedImage:
        with self._lock:
            self.calls.append(request.prompt)
            attempt = Counter(self.calls)[request.prompt]
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self._lock.notify_all()
        try:
            if self.hold_until_in_flight:
                with self._lock:
                    self._lock.wait_for(
                        lambda: self.peak_in_flight >= self.hold_until_in_flight, timeout=10
                    )
                threading.Event().wait(0.2)  # time for a call the window should not send
            worst = worst_case_cost(self.route.model_spec(), request)
            reservation = (budget or Budget()).reserve(worst, owner=charged_to)
            if (error := self.fail(request, attempt)) is not None:
                if isinstance(error, InvalidResponseError):  # a 200 without an image: paid
                    error.charges = reservation.charged(worst)
                else:
                    reservation.not_charged()
                raise error
            data = png_of(request.prompt)
            reservation.charged(worst)
            return GeneratedImage(
                data=data,
                media_type="image/png",
                sha256=hashlib.sha256(data).hexdigest(),
                width=request.width,
                height=request.height,
                request=request,
                model=self.route.model,
                route=self.route.route_name,
                generated_at=datetime.now(timezone.utc),
                cost_usd=worst,
            )
        finally:
            with self._lock:
                self.in_flight -= 1


_CLIENTS: dict[str, FakeClient] = {}


class FakeRoute(OpenAICredentials):
    """An OpenAI route whose client is the test's `FakeClient`."""

    _block_type_name = "Fake GPT Image Route"  # its own block type: OpenAI's stays registered

    def get_client(self) -> FakeClient:  # type: ignore[override]
        return _CLIENTS[self.base_url]


@pytest.fixture
def provider() -> FakeClient:
    route = FakeRoute(
        api_key=SecretStr("sk-test"), base_url=f"http://{uuid.uuid4().hex[:12]}.invalid/v1"
    )
    client = _CLIENTS[route.base_url] = FakeClient(route)
    return client


def worst_case(provider: FakeClient, *prompts: str) -> float:
    """What the prompts' generations cost at worst, which is what the fake client charges."""
    spec = provider.route.model_spec()
    return sum(worst_case_cost(spec, ImageRequest(prompt=prompt)) for prompt in prompts)


def run(
    provider: FakeClient,
    bucket: S3Bucket,
    prompts: Sequence[str | ImageRequest],
    *,
    max_concurrency: int = 2,
    max_cost_usd: float | None = None,
    planned: Callable[[Runner], None] = lambda runner: None,
) -> RunReport:
    """One run of `prompts`, as the flow plans and runs it; `planned` sees the runner
    after the plan, before the run."""

    @flow
    def runner_flow() -> RunReport:
        requests = [p if isinstance(p, ImageRequest) else ImageRequest(prompt=p) for p in prompts]
        routes = [provider.route]
        ledger = RunLedger(requests, routes)
        limits = ApiLimits(max_concurrency=max_concurrency)
        runner = Runner(
            ledger, generate_image, routes, limits, bucket, FOLDER, max_cost_usd, lambda key: key
        )
        runner.reuse_cached()
        runner.check_budget()
        planned(runner)
        progress = ProgressArtifact(total=len(requests))
        try:
            runner.run(progress)
        finally:
            progress.close()
        return ledger.report()

    return runner_flow()


def bucket_objects(bucket: S3Bucket) -> dict[str, bytes]:
    client = bucket.credentials.get_s3_client()
    listed = client.list_objects_v2(Bucket=bucket.bucket_name).get("Contents", [])
    return {
        item["Key"]: client.get_object(Bucket=bucket.bucket_name, Key=item["Key"])["Body"].read()
        for item in listed
    }


def test_identical_requests_share_one_generation_and_each_name_gets_its_own_object(
    provider: FakeClient, bucket: S3Bucket
) -> None:
    prompts: list[str | ImageRequest] = [
        "a red fox in snow",
        "a red fox in snow",
        ImageRequest(prompt="a red fox in snow", name="fox-for-the-poster"),
        "an owl at dusk",
    ]

    report = run(provider, bucket, prompts)

    assert sorted(provider.calls) == ["a red fox in snow", "an owl at dusk"]
    assert report.failures == [] and report.generated == 2
    assert report.cost_usd == pytest.approx(
        worst_case(provider, "a red fox in snow", "an owl at dusk")
    )
    assert [image.prompt for image in report.images] == [
        "a red fox in snow",
        "a red fox in snow",
        "a red fox in snow",
        "an owl at dusk",
    ]
    unnamed, same, named, owl = (image.key for image in report.images)
    assert unnamed == same and len({unnamed, named, owl}) == 3
    assert sum(image.cost_usd for image in report.images) == pytest.approx(report.cost_usd)
    objects = bucket_objects(bucket)
    assert objects == {
        unnamed: png_of("a red fox in snow"),
        named: png_of("a red fox in snow"),
        owl: png_of("an owl at dusk"),
    }


def test_a_run_whose_worst_case_passes_the_cap_is_refused_before_any_call(
    provider: FakeClient, bucket: S3Bucket
) -> None:
    worst = worst_case(provider, "a kettle", "a teapot", "a cup")
    cap = round(0.8 * worst, 2)
    prompts = ["a kettle", "a teapot", "a kettle", "a cup"]

    with pytest.raises(BudgetExceededError) as refused:
        run(provider, bucket, prompts, max_cost_usd=cap)

    assert str(refused.value) == (
        f"This run needs 3 new generations, up to ${worst:.2f} at worst (auto quality "
        f"priced as high), over max_cost_usd=${cap:.2f}. Nothing was generated: raise "
        "max_cost_usd or trim the prompts."
    )
    assert provider.calls == []
    assert bucket_objects(bucket) == {}


def test_the_window_sends_nothing_more_once_spent_and_in_flight_would_pass_the_cap(
    provider: FakeClient, bucket: S3Bucket
) -> None:
    """Each generation's first answer is charged but holds no image, so each costs twice
    its worst case: the plan fits the cap, the run's spend does not. The per-attempt cap
    (`run_budget`, which the flow sets) is left off here: this is the window's own check,
    the one that holds workers in other processes."""

    def broken_first(request: ImageRequest, attempt: int) -> GptImageError | None:
        return InvalidResponseError("The answer held no image.") if attempt == 1 else None

    provider.fail = broken_first
    prompts = ["a kettle", "a teapot", "a cup"]

    # One in flight at the throttle, so the window holds two: the kettle and the teapot.
    cap = worst_case(provider, *prompts)
    report = run(provider, bucket, prompts, max_concurrency=1, max_cost_usd=cap)

    assert Counter(provider.calls) == {"a kettle": 2, "a teapot": 2}
    assert [image.prompt for image in report.images] == ["a kettle", "a teapot"]
    assert report.cost_usd == pytest.approx(2 * worst_case(provider, "a kettle", "a teapot"))
    [cup] = report.failures
    assert (cup.prompt, cup.stage, cup.error_type) == (
        "a cup",
        "not attempted",
        "BudgetExceededError",
    )
    assert len(bucket_objects(bucket)) == 2


def test_an_error_that_stops_the_run_leaves_the_rest_unattempted(
    provider: FakeClient, bucket: S3Bucket
) -> None:
    """The only route rejects the key: every other request would fail the same way."""
    assert AuthenticationError.stops_run

    def rejected(request: ImageRequest, attempt: int) -> GptImageError:
        return AuthenticationError("The provider rejected the API key.", status_code=401)

    provider.fail = rejected
    prompts = [f"a lantern, study {number}" for number in range(6)]

    report = run(provider, bucket, prompts, max_concurrency=1)

    # The window held two when the first was rejected; the rest were never sent.
    assert 1 <= len(provider.calls) <= 2 and len(set(provider.calls)) == len(provider.calls)
    assert set(provider.calls) <= {prompts[0], prompts[1]}
    assert report.images == [] and report.cost_usd == 0
    stages = {failure.prompt: failure.stage for failure in report.failures}
    assert stages[prompts[0]] == "generate"
    assert [stages[prompt] for prompt in prompts[2:]] == ["not attempted"] * 4
    not_attempted = [failure for failure in report.failures if failure.stage == "not attempted"]
    assert {failure.error for failure in not_attempted} == {
        "Not attempted: the run stopped after AuthenticationError."
    }
    assert bucket_objects(bucket) == {}


def test_a_rerun_with_everything_cached_and_stored_makes_no_call(
    provider: FakeClient, bucket: S3Bucket
) -> None:
    prompts = ["a bicycle", "a tandem", "a bicycle"]
    first = run(provider, bucket, prompts)
    assert first.generated == 2 and len(provider.calls) == 2
    stored = bucket_objects(bucket)
    planned: list[tuple[int, bool]] = []

    def after_plan(runner: Runner) -> None:
        planned.append((runner.new_generations, runner.ledger.finished))

    again = run(provider, bucket, prompts, max_cost_usd=0.0, planned=after_plan)

    assert len(provider.calls) == 2  # none more
    assert planned == [(0, True)]  # recorded at the plan: no task run, no worst case to pay
    assert again.failures == [] and again.generated == 0 and again.from_cache == 2
    assert again.cost_usd == 0
    assert [image.key for image in again.images] == [image.key for image in first.images]
    assert all(image.cost_usd == 0 for image in again.images)
    assert bucket_objects(bucket) == stored


def test_requests_in_flight_never_exceed_the_window(provider: FakeClient, bucket: S3Bucket) -> None:
    """In one process the window is twice `max_concurrency` (the throttle, which the fake
    client has not, holds the API to `max_concurrency`)."""
    provider.hold_until_in_flight = 4
    prompts = [f"a paper boat, fold {number}" for number in range(12)]

    report = run(provider, bucket, prompts, max_concurrency=2)

    assert len(report.images) == 12 and report.failures == []
    assert len(provider.calls) == 12
    assert provider.peak_in_flight == 4
