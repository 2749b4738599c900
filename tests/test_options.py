"""The flow's option groups: each checks itself when it is made, takes a plain dict, and lets
the environment fill what a run leaves at its default."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from prefect_gpt_image import (
    ApiLimits,
    BatchOptions,
    CacheOptions,
    EditOptions,
    ImageOptions,
    LinkOptions,
    PromptTemplate,
)
from prefect_gpt_image.errors import ConfigurationError
from prefect_gpt_image.settings import with_environment


@pytest.mark.parametrize(
    ("group", "fields", "named"),
    [
        (ImageOptions, {"size": "big"}, "size"),
        (ImageOptions, {"size": "1024x0"}, "size"),
        (ImageOptions, {"quality": "ultra"}, "quality"),
        (ImageOptions, {"n": 11}, "n"),
        (ImageOptions, {"output_compression": 101}, "output_compression"),
        (ImageOptions, {"qualty": "high"}, "qualty"),
        (EditOptions, {"input_fidelity": "exact"}, "input_fidelity"),
        (BatchOptions, {"wait_minutes": -1}, "wait_minutes"),
        (ApiLimits, {"max_concurrency": 0}, "max_concurrency"),
        (ApiLimits, {"max_concurency": 2}, "max_concurency"),
        (CacheOptions, {"expiration_days": 0}, "expiration_days"),
        (LinkOptions, {"expiry_hours": 200}, "expiry_hours"),
        (PromptTemplate, {"template": ""}, "template"),
    ],
)
def test_a_group_refuses_a_bad_field_when_it_is_made_naming_it(
    group: type, fields: dict[str, object], named: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        TypeAdapter(group).validate_python(fields)
    assert refused.value.errors()[0]["loc"] == (named,)


def test_a_size_that_is_not_width_x_height_says_what_a_size_is() -> None:
    with pytest.raises(ValidationError, match=r"not WIDTHxHEIGHT in pixels, such as 1536x1024"):
        ImageOptions(size="square")


def test_a_dict_and_the_model_are_the_same_options() -> None:
    assert TypeAdapter(ImageOptions).validate_python({"quality": "high"}) == ImageOptions(
        quality="high"
    )
    assert ImageOptions(size="1536x1024", quality="high").request_fields() == {
        "width": 1536,
        "height": 1024,
        "quality": "high",
        "n": 1,
    }


def test_the_batch_api_is_on_with_its_options_and_off_by_the_flows_default() -> None:
    from prefect_gpt_image.options import SYNCHRONOUS

    assert BatchOptions().enabled and TypeAdapter(BatchOptions).validate_python({}).enabled
    assert not SYNCHRONOUS.enabled


def test_what_a_run_gives_is_what_differs_from_the_default() -> None:
    """A form sends back every default it shows: those are not the run's choices."""
    echoed = TypeAdapter(ApiLimits).validate_python(
        {"max_concurrency": 8, "global_rate_limit": "x"}
    )
    assert echoed.given() == {"global_rate_limit": "x"}


def test_the_environment_fills_what_a_run_leaves_at_its_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPT_IMAGE_MAX_CONCURRENCY", "3")
    monkeypatch.setenv("GPT_IMAGE_GLOBAL_RATE_LIMIT", "plan-rate")
    monkeypatch.setenv("GPT_IMAGE_CACHE_STORAGE", "shared-cache")
    monkeypatch.setenv("GPT_IMAGE_REDIS_LOCK_URL", "redis://locks:6379/0")
    monkeypatch.setenv("GPT_IMAGE_PUBLIC_BASE_URL", "https://cdn.example.com/")
    monkeypatch.setenv("GPT_IMAGE_LINK_EXPIRY_HOURS", "2")

    limits = with_environment(ApiLimits(max_concurrency=8))  # the default, sent back by a form
    assert (limits.max_concurrency, limits.global_rate_limit) == (3, "plan-rate")
    cache = with_environment(CacheOptions(refresh=True))
    assert (cache.refresh, cache.storage, cache.redis_lock_url) == (
        True,
        "shared-cache",
        "redis://locks:6379/0",
    )
    links = with_environment(LinkOptions())
    assert (links.public_base_url, links.expiry_hours) == ("https://cdn.example.com/", 2)


def test_a_runs_own_value_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT_IMAGE_MAX_CONCURRENCY", "3")
    monkeypatch.setenv("GPT_IMAGE_PUBLIC_BASE_URL", "https://cdn.example.com/")
    assert with_environment(ApiLimits(max_concurrency=5)).max_concurrency == 5
    own = LinkOptions(public_base_url="https://own.example.com/")
    assert with_environment(own).public_base_url == "https://own.example.com/"


def test_a_setting_its_option_would_refuse_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPT_IMAGE_MAX_CONCURRENCY", "0")
    with pytest.raises(ConfigurationError, match="max_concurrency"):
        with_environment(ApiLimits())
