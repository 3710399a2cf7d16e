"""Shared rich console and the wrapper that turns user errors into one clean message."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from rich.console import Console

from ccnf.errors import CcnfError

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def report_user_errors(fn: F) -> F:
    """Run ``fn``; a :class:`CcnfError` prints as 'error: ...' and exits 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CcnfError as err:
            console.print(f"[bold red]error:[/] {err.render()}", highlight=False)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
