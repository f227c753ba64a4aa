"""Pictures of predictions and metrics: colour maps, overlays with legends, figures.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``, never
pyplot), so nothing here needs a display or touches global plotting state. What is shown where,
and under which tags, is the loggers' (``fcnseg.engine.loggers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from fcnseg.utils.normalization import denormalize

Palette = np.ndarray | Sequence[Sequence[int]]


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


def full_palette(colors: Palette | None = None) -> np.ndarray:
    """A 256-entry palette: ``colors`` for the first classes, the VOC map for the rest
    (so the ignore value 255 keeps VOC's (224, 224, 192) whatever the dataset's colours)."""
    out = palette()
    if colors is not None:
        colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)[:256]
        out[: len(colors)] = colors
    return out


def colorize(labels: torch.Tensor, colors: Palette | None = None) -> torch.Tensor:
    """(N, H, W) labels -> (N, 3, H, W) uint8 colours; values outside 0-255 wrap."""
    table = _PALETTE if colors is None else torch.from_numpy(full_palette(colors))
    return table.to(labels.device)[labels.long() % 256].permute(0, 3, 1, 2)


def prediction_grid(
    images: torch.Tensor,
    targets: torch.Tensor,
    preds: torch.Tensor,
    max_rows: int = 4,
    colors: Palette | None = None,
) -> torch.Tensor:
    """One row per sample: input | ground truth | prediction, as a (3, H', W') uint8 image."""
    n = min(max_rows, images.shape[0])
    rows = [
        torch.cat(
            [
                images[i],
                colorize(targets[i : i + 1], colors)[0],
                colorize(preds[i : i + 1], colors)[0],
            ],
            dim=-1,
        )
        for i in range(n)
    ]
    return torch.cat(rows, dim=-2).cpu()


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    class_names: Sequence[str],
    colors: Palette | None = None,
    alpha: float = 0.5,
    ignore_index: int = 255,
    legend: bool = True,
) -> np.ndarray:
    """The image blended with its label colours, with a legend of the classes present.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) class indices.
        class_names: one name per class, for the legend.
        colors: class colours; the VOC map by default.
        alpha: weight of the label colours.
        ignore_index: pixels with this value keep the image's colour and are not in the legend.
        legend: append the legend as a white panel on the right (the left part keeps the
            image's exact size and pixels positions).

    Returns:
        (H', W', 3) uint8: H' = H unless the legend is taller, W' >= W.
    """
    table = full_palette(colors)
    labels = np.asarray(labels)
    blend = image.astype(np.float32) * (1 - alpha) + table[labels.astype(np.int64) % 256] * alpha
    out = np.where((labels == ignore_index)[..., None], image, blend.round().astype(np.uint8))
    if not legend:
        return out
    present = [int(c) for c in np.unique(labels) if c != ignore_index and 0 <= c < len(class_names)]
    return _with_legend(out, [(class_names[c], tuple(int(v) for v in table[c])) for c in present])


def _with_legend(image: np.ndarray, entries: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    h, w = image.shape[:2]
    # Text about 1/40 of the image height, readable from thumbnails to 2048x1024 frames.
    size = int(np.clip(h / 40, 11, 32))
    font = ImageFont.load_default(size=size)
    pad, swatch, line = size // 2, size, int(size * 1.5)
    text_w = max((int(font.getlength(name)) for name, _ in entries), default=0)
    panel_w = 3 * pad + swatch + text_w
    canvas = Image.new("RGB", (w + panel_w, max(h, 2 * pad + line * len(entries))), "white")
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (name, color) in enumerate(entries):
        y = pad + k * line
        draw.rectangle(
            [w + pad, y, w + pad + swatch - 1, y + swatch - 1], fill=color, outline="black"
        )
        draw.text(
            (w + 2 * pad + swatch, y + swatch / 2), name, fill="black", font=font, anchor="lm"
        )
    return np.asarray(canvas)


def confusion_figure(
    confusion: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str]
) -> Figure:
    """The confusion matrix with each ground-truth row normalised to sum to 1 (recall on the
    diagonal), so that rare classes read as clearly as frequent ones."""
    conf = np.asarray(confusion, dtype=np.float64)
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    n = len(class_names)
    side = max(4.0, 0.45 * n + 2)
    fig = Figure(figsize=(side + 1, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), class_names, rotation=90)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (rows normalised)")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color
                    )
    fig.tight_layout()
    return fig


def iou_figure(metrics: dict[str, Any]) -> Figure:
    """Per-class IoU as horizontal bars, with the mIoU as a dashed line; classes without an IoU
    (absent from ground truth and prediction) are marked n/a."""
    names, ious = metrics["class_names"], metrics["iou"]
    n = len(names)
    fig = Figure(figsize=(7, max(2.5, 0.3 * n + 1)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = [0.0 if v is None else 100 * v for v in ious]
    ax.barh(range(n), values, color="tab:blue")
    for i, v in enumerate(ious):
        ax.text(values[i] + 1, i, "n/a" if v is None else f"{100 * v:.1f}", va="center", fontsize=8)
    ax.axvline(
        100 * metrics["miou"],
        color="tab:red",
        linestyle="--",
        zorder=0,
        label=f"mIoU {100 * metrics['miou']:.1f}",
    )
    ax.set_yticks(range(n), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("IoU (%)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def sample_rows(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    normalize: str,
    *,
    colors: Palette | None = None,
    max_side: int = 512,
) -> torch.Tensor:
    """Input | ground truth | prediction rows for samples of any sizes, each shrunk to at most
    ``max_side`` and padded to the widest: one (3, H, W) uint8 image."""
    rows = []
    for img, tgt, pred in samples:
        h, w = tgt.shape[-2:]
        f = min(1.0, max_side / max(h, w))
        size = (max(1, round(h * f)), max(1, round(w * f)))
        rgb = denormalize(img[None].float(), normalize)
        labels = torch.stack([tgt, pred])[:, None].float()
        if size != (h, w):
            rgb = (
                F.interpolate(rgb.float(), size=size, mode="bilinear", antialias=True)
                .round()
                .to(torch.uint8)
            )
            labels = F.interpolate(labels, size=size, mode="nearest")
        labels = labels[:, 0].long()
        rows.append(prediction_grid(rgb, labels[:1], labels[1:], colors=colors))
    width = max(r.shape[-1] for r in rows)
    return torch.cat([F.pad(r, (0, width - r.shape[-1])) for r in rows], dim=-2)
