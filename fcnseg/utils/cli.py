"""What scripts share: turning user errors into one sentence and an exit code."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from fcnseg.errors import UserError


@contextlib.contextmanager
def user_errors(program: str = "fcnseg") -> Iterator[None]:
    """Prints ``UserError`` as ``program: error: message`` and exits with status 2."""
    try:
        yield
    except UserError as err:
        print(f"{program}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
