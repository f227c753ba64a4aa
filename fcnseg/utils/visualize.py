"""Colouring label maps and laying out input / ground truth / prediction grids."""

from __future__ import annotations

import numpy as np
import torch


def palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), (num_colors, 3) uint8.

    Class 0 is black, 255 (ignore) is (224, 224, 192) as in VOC's label PNGs.
    """
    out = np.zeros((num_colors, 3), np.uint8)
    for i in range(num_colors):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


_PALETTE = torch.from_numpy(palette())


def colorize(labels: torch.Tensor) -> torch.Tensor:
    """(N, H, W) labels -> (N, 3, H, W) uint8 colours; values outside 0-255 wrap."""
    return _PALETTE.to(labels.device)[labels.long() % 256].permute(0, 3, 1, 2)


def prediction_grid(
    images: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor, max_rows: int = 4
) -> torch.Tensor:
    """One row per sample: input | ground truth | prediction, as a (3, H', W') uint8 image."""
    n = min(max_rows, images.shape[0])
    rows = [
        torch.cat([images[i], colorize(targets[i : i + 1])[0], colorize(preds[i : i + 1])[0]], dim=-1)
        for i in range(n)
    ]
    return torch.cat(rows, dim=-2).cpu()
