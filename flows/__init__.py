"""Prefect flows that compose the tasks over prompt sets."""

from prefect_gpt_image.flows.generate_images import generate_images

__all__ = ["generate_images"]
