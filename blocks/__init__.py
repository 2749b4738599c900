"""Prefect blocks: configuration and secrets, editable in the Prefect UI."""

from prefect_gpt_image.blocks.credentials import RapidAPICredentials

__all__ = ["RapidAPICredentials"]
