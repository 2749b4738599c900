"""The events a run emits, for Prefect automations to act on (a Slack message, an e-mail):
each names the run's flow run as a related resource and carries the figures a person would
want in the notification."""

from __future__ import annotations

import logging
from typing import Any, Final

from prefect.events import emit_event
from prefect.runtime import flow_run

logger = logging.getLogger(__name__)

REVIEW_REQUESTED: Final = "prefect-gpt-image.review.requested"
IMAGES_PUBLISHED: Final = "prefect-gpt-image.images.published"
ROUTE_DROPPED: Final = "prefect-gpt-image.route.dropped"
BUDGET_EXHAUSTED: Final = "prefect-gpt-image.budget.exhausted"
BATCH_WAITING: Final = "prefect-gpt-image.batch.waiting"
EVENTS: Final = (REVIEW_REQUESTED, IMAGES_PUBLISHED, ROUTE_DROPPED, BUDGET_EXHAUSTED, BATCH_WAITING)


def emit(event: str, payload: dict[str, Any]) -> None:
    """Emit `event` about this flow run; outside one, about the local process."""
    run_id, name = flow_run.get_id(), flow_run.get_name()
    resource = {
        "prefect.resource.id": f"prefect-gpt-image.run.{run_id or 'local'}",
        "prefect.resource.name": name or "local",
    }
    related = []
    if run_id is not None:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow-run.{run_id}",
                "prefect.resource.role": "flow-run",
                "prefect.resource.name": name or "",
            }
        )
    try:
        emit_event(event=event, resource=resource, related=related, payload=payload)
    except Exception:  # a notification is a courtesy: never fail a run over it
        logger.warning("Could not emit %s", event, exc_info=True)
