"""What calls were charged: the record the billing rule fills in and every result carries.

A leaf module, so that errors, results and the budget can all hold one.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Charges(BaseModel):
    """Answers the provider charged for, what they cost, and what calls that timed out
    after they were sent may have cost (the provider may have finished, and billed, them)."""

    model_config = ConfigDict(frozen=True)

    calls: int = Field(default=0, ge=0, description="Answers charged for.")
    usd: float = Field(default=0.0, ge=0, description="What those answers cost.")
    possibly_usd: float = Field(
        default=0.0, ge=0, description="What calls that timed out after they were sent may cost."
    )

    def __add__(self, other: Charges) -> Charges:
        return Charges(
            calls=self.calls + other.calls,
            usd=round(self.usd + other.usd, 6),
            possibly_usd=round(self.possibly_usd + other.possibly_usd, 6),
        )


NO_CHARGES = Charges()
