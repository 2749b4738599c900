"""Serve the flow on a schedule, for users without a work pool.

    python deployments/serve.py

Runs until stopped; Prefect starts a run every Monday at 06:00 in Europe/Paris,
which sends the week's prompts through OpenAI's Batch API at half price, and the same
run every 15 minutes after, which stores what the batch has answered (change the crons
below). The UI's "Run" button starts one with your own parameters, the flow's options in
their groups (image, edit, batch, limits, cache, links). The credentials and bucket are the
names of saved blocks (see the README), so no secret is written here; a run whose new images
could cost more than `max_cost_usd` is refused before anything is paid.
"""

from prefect.schedules import Cron

from prefect_gpt_image import generate_images

if __name__ == "__main__":
    generate_images.serve(
        name="weekly-creatives",
        schedules=[
            Cron("*/15 6-23 * * 1", timezone="Europe/Paris"),
            Cron("*/15 0-6 * * 2", timezone="Europe/Paris"),
        ],
        parameters={
            "prompts": "s3://my-creatives/prompts/this-week.txt",
            "bucket": "creatives-bucket",
            "credentials": "openai-gpt-image",
            "prefix": "weekly",
            "max_cost_usd": 50,
            "batch": {"wait_minutes": 0},
        },
        tags=["gpt-image"],
    )
