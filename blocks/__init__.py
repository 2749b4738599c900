"""Prefect blocks: configuration and secrets, editable in the Prefect UI."""

from prefect_gpt_image.blocks.credentials import RapidAPICredentials
from prefect_gpt_image.blocks.openai_credentials import OpenAICredentials

__all__ = ["OpenAICredentials", "RapidAPICredentials"]
