"""What the emulator's routes share: one fault queue, one rate limit, one studio, one store of
hosted images and one record of calls, so that a test's faults, limits and counts hold for
whichever route a request takes."""

from __future__ import annotations

from dataclasses import dataclass

from prefect_gpt_image.testing._drawing import _Studio
from prefect_gpt_image.testing._faults import _FaultQueue, _RateLimit
from prefect_gpt_image.testing._records import _Records
from prefect_gpt_image.testing._server import _ImageStore


@dataclass(frozen=True)
class _Shared:
    faults: _FaultQueue
    limit: _RateLimit
    studio: _Studio
    store: _ImageStore
    records: _Records
