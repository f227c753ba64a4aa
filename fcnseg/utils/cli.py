"""What scripts share: turning user errors into one sentence and an exit code."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fcnseg.errors import UserError


def is_installed_command(path: str) -> bool:
    """Whether ``path`` is one of the commands ``pip install fcnseg`` puts on PATH."""
    return Path(path).name.startswith("fcnseg-")


@contextlib.contextmanager
def user_errors(
    program: str = "fcnseg", *, also: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Prints a user error as ``program: error: message`` on one line and exits with status 2.

    An installed command (``fcnseg-train``) speaks under its own name rather than ``program``.

    A user error is a ``UserError``, one of the ``also`` types (e.g. a config system's error
    for a key that names a bad argument), or any exception caused by either: a ``UserError``
    raised inside a factory that a config system called comes out wrapped in the caller's error.
    """
    try:
        yield
    except Exception as err:
        culprit = _find_cause(err, UserError) or _find_cause(err, also)
        if culprit is None:
            raise
        message = " ".join(str(culprit).split())  # one line, whatever the wrapper made of it
        if sys.argv and is_installed_command(sys.argv[0]):
            program = Path(sys.argv[0]).name
        print(f"{program}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _find_cause(
    err: BaseException | None, types: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if types and isinstance(err, types):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


def check_settings(section: str, given: Iterable[str], target: Callable) -> None:
    """Refuses a key of config ``section`` that ``target`` has no keyword argument for.

    Python would say ``unexpected keyword argument``; the user wrote ``+section.key=value``.
    """
    accepted = [
        name
        for name, p in inspect.signature(target).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unknown = [key for key in given if key not in accepted and not key.startswith("_")]
    if unknown:
        raise UserError(
            f"{section}.{unknown[0]} is not a {section} setting; the settings are: "
            f"{', '.join(accepted)}"
        )
