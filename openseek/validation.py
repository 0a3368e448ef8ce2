"""The one validation idiom: a bad value raises FieldError, which carries the field's name.

Stdlib only. Callers that must point at the field (the server's 400 `param`) read `error.field`, never the text.
"""

from __future__ import annotations

import math
from typing import Any


class FieldError(ValueError):
    """`field=value is invalid: allowed`; `field` names what to fix, `owner` (e.g. "config field ") prefixes it."""

    def __init__(self, field: str, value: Any, allowed: str, owner: str = ""):
        super().__init__(f"{owner}{field}={value!r} is invalid: {allowed}")
        self.field, self.value, self.allowed = field, value, allowed


def check(ok: bool, field: str, value: Any, allowed: str, owner: str = "") -> None:
    """Raise FieldError(field, value, allowed) unless ok."""
    if not ok:
        raise FieldError(field, value, allowed, owner)


def is_int(x: object) -> bool:
    """An int that is not a bool (JSON's true is not 1 here)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
