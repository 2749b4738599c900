"""Real servers on loopback for tests and demos of GPT Image flows.

The real GPT Image APIs cannot be reached (or paid for) from tests, so `GptImageEmulator`
stands in for them: an HTTP server that speaks both RapidAPI's protocol and OpenAI's Images
API, with the same requests, answers and failure modes.
`LocalS3Server` runs `rclone serve s3` over a folder, an S3 endpoint that checks signatures.
`prefect_server` starts a real Prefect server, for deployments, workers and the UI.

Names are imported on first use: the package stays cheap to import (no Prefect, no Pillow)
and `python -m prefect_gpt_image.testing.emulator` runs without a double import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect_gpt_image.testing.emulator import (
        OPENAI_MODELS,
        RESPONSE_SHAPES,
        Fault,
        GptImageEmulator,
        RecordedCall,
    )
    from prefect_gpt_image.testing.local_prefect import prefect_server
    from prefect_gpt_image.testing.s3_server import LocalS3Server

__all__ = [
    "OPENAI_MODELS",
    "RESPONSE_SHAPES",
    "Fault",
    "GptImageEmulator",
    "LocalS3Server",
    "RecordedCall",
    "prefect_server",
]

_MODULES = {
    "OPENAI_MODELS": "emulator",
    "RESPONSE_SHAPES": "emulator",
    "Fault": "emulator",
    "GptImageEmulator": "emulator",
    "RecordedCall": "emulator",
    "LocalS3Server": "s3_server",
    "prefect_server": "local_prefect",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
