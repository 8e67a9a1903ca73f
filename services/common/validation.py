"""The shape of a validation failure, shared by every service's pure domain code."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: its path in the request (e.g. ``items[3].high``) and what is wrong with it."""

    field: str
    description: str


class ValidationFailed(ValueError):
    """Raised by domain code when input breaks its rules; carries every violation found."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations
