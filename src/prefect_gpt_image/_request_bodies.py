"""What is sent for a request: the API fields beyond the prompt and size, and each
protocol's body. The cache key is made of the same fields, so that what changes the
picture changes the key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect_gpt_image.models import ImageRequest


def api_fields(request: ImageRequest, default_extras: Mapping[str, Any]) -> dict[str, Any]:
    """The block's defaults, then the request's extras, then its typed fields that are set
    (`n` only above one, so that a plain request's body and key stay as they were)."""
    typed = {
        "quality": request.quality,
        "complexity": request.complexity,
        "n": request.n if request.n != 1 else None,
        "output_format": request.output_format,
        "output_compression": request.output_compression,
        "background": request.background,
        "moderation": request.moderation,
        "input_fidelity": request.input_fidelity,
    }
    return {
        **default_extras,
        **request.extras,
        **{name: value for name, value in typed.items() if value is not None},
    }


def rapidapi_body(request: ImageRequest, default_extras: Mapping[str, Any]) -> dict[str, Any]:
    """NexaAPI's JSON body: the fields, the prompt, and the size as width and height."""
    return {
        **api_fields(request, default_extras),
        "prompt": request.prompt,
        "width": request.width,
        "height": request.height,
    }


def openai_body(
    request: ImageRequest, model: str, default_extras: Mapping[str, Any]
) -> dict[str, Any]:
    """OpenAI's `/images/generations` body: the size as "WxH" (the API refuses width and
    height), and GPT Image models always answer in base64."""
    return {
        **api_fields(request, default_extras),
        "model": model,
        "prompt": request.prompt,
        "size": request.size,
    }
