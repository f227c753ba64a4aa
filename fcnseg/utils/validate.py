"""Checks of values that users write in configs, each failing with one sentence naming the key."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fcnseg.errors import UserError


def size_pair(value: int | Sequence[int], *, name: str, minimum: int = 1) -> tuple[int, int]:
    """``(height, width)`` from one side or a ``[height, width]`` pair of whole numbers.

    Crop sizes, window sizes, strides and kernel sizes are all written either way in configs
    and code; this is the one place that reads them.

    Args:
        value: a side, or a pair (a list from YAML, a tuple, a ``torch.Size``).
        name: the config key or argument, for the message (``dataset.crop_size``).
        minimum: the smallest allowed side (0 for paddings).

    Raises:
        UserError: not one or two whole numbers, or a side below ``minimum``.
    """
    sides = [value, value] if _is_whole(value) else None
    if sides is None and isinstance(value, Sequence | np.ndarray) and not isinstance(value, str):
        sides = list(value)
    if sides is None or len(sides) != 2 or not all(_is_whole(s) and s >= minimum for s in sides):
        what = "positive" if minimum == 1 else f"at least {minimum}"
        raise UserError(f"{name}={value!r} must be a side or a [height, width] pair, {what}")
    return int(sides[0]), int(sides[1])


def _is_whole(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
