"""What a run's log tells a person who opens it in Prefect's UI: the plan, the routes, the
outcome and each failure, each said once. Per-image lines stay at DEBUG, so that a run of
ten thousand images logs a handful of lines."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prefect_gpt_image._billing import run_budget
from prefect_gpt_image._events import BATCH_WAITING, BUDGET_EXHAUSTED, emit
from prefect_gpt_image._ledger import RunLedger, failure_lines
from prefect_gpt_image.errors import BudgetExceededError
from prefect_gpt_image.models import RunReport

CROP_WORTH_TELLING = 0.25
"""A placement whose renditions lose this share of their source or more is named in the log."""

if TYPE_CHECKING:
    from prefect_gpt_image._runner import Runner

    Logger = logging.Logger | logging.LoggerAdapter[Any]


def tell_plan(logger: Logger, ledger: RunLedger, runner: Runner, destination: str) -> None:
    """How many prompts, how many distinct, cached, new and refused, the most the new ones
    can cost, and the routes they take, in order."""
    distinct, new = len(ledger.groups), runner.new_generations
    refused = f", {ledger.refused_count} refused" if ledger.refused_count else ""
    logger.info(
        "%d prompts, %d distinct: %d from the cache, %d new (at most $%.2f)%s; into %s",
        len(ledger.requests),
        distinct,
        distinct - new - ledger.refused_count,
        new,
        runner.worst_case_usd,
        refused,
        destination,
    )
    if (campaign := ledger.campaign) is not None:
        masters = sorted({request.size for request in ledger.requests[: ledger.prompt_count]})
        logger.info(
            "Each delivered at %d placements (%s), adapt=%s, from masters of %s",
            len(campaign.placements),
            ", ".join(f"{p.name} {p.size}" for p in campaign.placements),
            campaign.adapt,
            ", ".join(masters),
        )
    routes = ", then ".join(f"{route.route_name} ({route.model})" for route in ledger.routes)
    through = " through OpenAI's Batch API" if ledger.batch_api else ""
    logger.info("%s%s: %s", "Routes" if len(ledger.routes) > 1 else "Route", through, routes)


def tell_outcome(logger: Logger, report: RunReport) -> None:
    """What the run stored and cost, where its manifest is, and each failure."""
    logger.info("%s; manifest at %s", report.summary(), report.manifest_uri)
    cropped: dict[str, float] = {}
    for image in report.images:
        if image.placement is not None and (image.cropped or 0) >= CROP_WORTH_TELLING:
            cropped[image.placement] = max(cropped.get(image.placement, 0.0), image.cropped or 0)
    for placement, share in cropped.items():
        logger.info(
            "%s is cut from an image of another shape: up to %.0f%% of it cropped away",
            placement,
            100 * share,
        )
    lines, more = failure_lines(report.failures)
    for line in lines:
        logger.warning("Failed: %s", line)
    if more:
        logger.warning("... and %d more failed, listed in %s", more, report.manifest_uri)
    stopped = [f for f in report.failures if f.error_type == BudgetExceededError.__name__]
    if stopped:
        emit(
            BUDGET_EXHAUSTED,
            {
                "max_cost_usd": run_budget().max_usd,
                "spent_usd": report.cost_usd,
                "not_attempted": sum(f.stage == "not attempted" for f in stopped),
                "stopped": len(stopped),
            },
        )
    if report.waiting:
        batches = sorted({prompt.batch_id for prompt in report.waiting})
        emit(
            BATCH_WAITING,
            {"prompts": len(report.waiting), "batches": batches, "manifest": report.manifest_uri},
        )
