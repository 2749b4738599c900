"""Prefect tasks: one unit of work each, one paid generation or one upload."""

from prefect_gpt_image.tasks.generate import generate_image
from prefect_gpt_image.tasks.upload import upload_image

__all__ = ["generate_image", "upload_image"]
