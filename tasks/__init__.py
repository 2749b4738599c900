"""Prefect tasks: one unit of work each, one paid generation or one upload, each with an
async twin for async flows."""

from prefect_gpt_image.tasks.generate import agenerate_image, generate_image
from prefect_gpt_image.tasks.upload import aupload_image, upload_image

__all__ = ["agenerate_image", "aupload_image", "generate_image", "upload_image"]
