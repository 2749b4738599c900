"""Create the automation that tells the reviewers when a run waits for them.

Save a notification block first (Slack: `prefect block create slack-webhook`, named
`review-notifications`, say), then:

    python deployments/review_automation.py --block slack-webhook/review-notifications

The automation sends a message through that block on every
`prefect-gpt-image.review.requested` event: how many images, which round, and the link to
the run's gallery, where the decision is made. Running the script again replaces it.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from datetime import timedelta
from uuid import UUID

from prefect.automations import Automation, EventTrigger, Posture, SendNotification
from prefect.blocks.core import Block

NAME = "gpt-image-review-requested"
SUBJECT = "Images to review: {{ event.resource['prefect.resource.name'] }}"
BODY = (
    "{{ event.payload.images }} image(s) and {{ event.payload.renditions }} rendition(s) of "
    "the run {{ event.resource['prefect.resource.name'] }} wait for review, round "
    "{{ event.payload.round }} of {{ event.payload.max_rounds }}, for up to "
    "{{ event.payload.timeout_hours }} hours. See them and decide: {{ event.payload.gallery }}"
)


def review_automation(block_document_id: UUID) -> Automation:
    """The automation: a notification through the block, for each review requested."""
    return Automation(
        name=NAME,
        description="Tells the reviewers that a prefect-gpt-image run waits for their decision.",
        trigger=EventTrigger(
            expect={"prefect-gpt-image.review.requested"},
            match={"prefect.resource.id": "prefect-gpt-image.run.*"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[SendNotification(block_document_id=block_document_id, subject=SUBJECT, body=BODY)],
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--block",
        default="slack-webhook/review-notifications",
        help="a saved notification block, as BLOCK_TYPE/NAME "
        "(default: slack-webhook/review-notifications)",
    )
    args = parser.parse_args(argv)
    block = Block.load(args.block)
    if block._block_document_id is None:
        raise SystemExit(f"The block {args.block!r} is not saved.")
    with contextlib.suppress(ValueError):  # ValueError: none yet
        Automation.read(name=NAME).delete()
    created = review_automation(block._block_document_id).create()
    print(f"Created the automation {created.name} ({created.id}).")


if __name__ == "__main__":
    main()
