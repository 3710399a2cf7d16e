"""User-facing errors.

A :class:`CcnfError` is a mistake the user can fix (bad params, bad data, missing weights).
Stage scripts and the CLI print it as one readable message and exit non-zero, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from typing import Any


class CcnfError(Exception):
    """A user-fixable error: says what went wrong, where, and how to fix it."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # keeps where/fix across processes (evaluation workers send their errors back pickled)
        return functools.partial(type(self), where=self.where, fix=self.fix), (self.what,)

    def render(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"  where: {self.where}")
        if self.fix:
            parts.append(f"  fix:   {self.fix}")
        return "\n".join(parts)


class NonFiniteLossError(CcnfError):
    """Training produced a NaN/inf loss term; no checkpoint is written."""
