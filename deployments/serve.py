"""Serve the batch flow on a schedule, for users without a work pool.

    python deployments/serve.py

Runs until stopped; Prefect starts a run every Monday at 06:00 in Europe/Paris
(change the cron below), and the UI's "Run" button starts one with your own
parameters. The credentials and bucket are the names of saved blocks (see the
README), so no secret is written here.
"""

from prefect.schedules import Cron

from prefect_gpt_image import generate_images

if __name__ == "__main__":
    generate_images.serve(
        name="weekly-creatives",
        schedule=Cron("0 6 * * 1", timezone="Europe/Paris"),
        parameters={
            "prompts": "s3://my-creatives/prompts/this-week.txt",
            "bucket": "creatives-bucket",
            "credentials": ["gpt-image-credentials", "openai-gpt-image"],
            "prefix": "weekly",
        },
        tags=["gpt-image"],
    )
