"""Generate images with GPT Image inside Prefect, and store them in S3-compatible buckets.

The public API is what this module exports, with the `blocks`, `tasks`, `flows`,
`models`, `options`, `settings`, `errors`, `model_table`, `placement_table` and `testing`
modules; modules whose names start with an underscore are internal, and may change in any
release.

Names are imported on first use, so that `import prefect_gpt_image` (and the
command line's `--help`) does not pay for importing Prefect and boto3.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "RapidAPICredentials": "prefect_gpt_image.blocks.credentials",
    "OpenAICredentials": "prefect_gpt_image.blocks.openai_credentials",
    "ModelSpec": "prefect_gpt_image.model_table",
    "Placement": "prefect_gpt_image.placement_table",
    "SafeZone": "prefect_gpt_image.placement_table",
    "ApiLimits": "prefect_gpt_image.models",
    "ImageRequest": "prefect_gpt_image.models",
    "GeneratedImage": "prefect_gpt_image.models",
    "StoredImage": "prefect_gpt_image.models",
    "PromptFailure": "prefect_gpt_image.models",
    "RunReport": "prefect_gpt_image.models",
    "GenerationClient": "prefect_gpt_image._client",
    "AsyncGenerationClient": "prefect_gpt_image._client",
    "generate_image": "prefect_gpt_image.tasks.generate",
    "agenerate_image": "prefect_gpt_image.tasks.generate",
    "upload_image": "prefect_gpt_image.tasks.upload",
    "aupload_image": "prefect_gpt_image.tasks.upload",
    "generate_images": "prefect_gpt_image.flows.generate_images",
    "ImageOptions": "prefect_gpt_image.options",
    "EditOptions": "prefect_gpt_image.options",
    "BatchOptions": "prefect_gpt_image.options",
    "ReviewDecision": "prefect_gpt_image.options",
    "ReviewOptions": "prefect_gpt_image.options",
    "CacheOptions": "prefect_gpt_image.options",
    "LinkOptions": "prefect_gpt_image.options",
    "PromptTemplate": "prefect_gpt_image.options",
    "load_prompts": "prefect_gpt_image._prompt_sets",
}

__all__ = [
    "ApiLimits",
    "AsyncGenerationClient",
    "BatchOptions",
    "CacheOptions",
    "EditOptions",
    "GeneratedImage",
    "GenerationClient",
    "ImageOptions",
    "ImageRequest",
    "LinkOptions",
    "ModelSpec",
    "OpenAICredentials",
    "Placement",
    "PromptFailure",
    "PromptTemplate",
    "RapidAPICredentials",
    "ReviewDecision",
    "ReviewOptions",
    "RunReport",
    "SafeZone",
    "StoredImage",
    "__version__",
    "agenerate_image",
    "aupload_image",
    "generate_image",
    "generate_images",
    "load_prompts",
    "upload_image",
]

if TYPE_CHECKING:
    from prefect_gpt_image._client import AsyncGenerationClient, GenerationClient
    from prefect_gpt_image._prompt_sets import load_prompts
    from prefect_gpt_image.blocks.credentials import RapidAPICredentials
    from prefect_gpt_image.blocks.openai_credentials import OpenAICredentials
    from prefect_gpt_image.flows.generate_images import generate_images
    from prefect_gpt_image.model_table import ModelSpec
    from prefect_gpt_image.models import (
        ApiLimits,
        GeneratedImage,
        ImageRequest,
        PromptFailure,
        RunReport,
        StoredImage,
    )
    from prefect_gpt_image.options import (
        BatchOptions,
        CacheOptions,
        EditOptions,
        ImageOptions,
        LinkOptions,
        PromptTemplate,
        ReviewDecision,
        ReviewOptions,
    )
    from prefect_gpt_image.placement_table import Placement, SafeZone
    from prefect_gpt_image.tasks.generate import agenerate_image, generate_image
    from prefect_gpt_image.tasks.upload import aupload_image, upload_image


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prefect_gpt_image' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
