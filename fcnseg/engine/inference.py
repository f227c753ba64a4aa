"""Inference at full resolution: whole images, sliding windows, multi-scale and flip TTA.

Every view of an image (a scale, possibly mirrored) is run through the network, its logits are
brought back to the input's resolution with bilinear interpolation and averaged there, and the
prediction is the argmax of that average.

Memory is the constraint for large images (Cityscapes is 2048x1024, 19 classes: 152 MiB of
float32 logits per copy). The full-resolution logits exist once, as the accumulator: each
view is resampled into it a few rows at a time, and in ``slide`` mode the windows of a view
are summed into a band of rows that is flushed into the accumulator as soon as no later window
can touch it, so neither a second full-resolution copy nor a whole up-scaled (scale > 1) copy
is ever held. In ``whole`` mode the network's own output at each scale is the one large extra
tensor; use ``slide`` when that does not fit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.errors import UserError
from fcnseg.utils.validate import size_pair

MODES = ("whole", "slide")
# Rows resampled at a time: bounds the temporaries to (C, ROWS, W) whatever the image size.
ROWS_PER_CHUNK = 64


class Inference:
    """How an image becomes logits: ``whole`` or ``slide``, at some scales, optionally mirrored.

    Args:
        mode: ``whole`` runs the network on the full image; ``slide`` on ``crop_size`` windows
            taken every ``stride`` pixels, averaging the logits where windows overlap (for
            images too large for one pass). Windows never exceed the image, so an image no
            larger than ``crop_size`` is a single window, identical to ``whole``.
        crop_size: window side or ``(height, width)`` (``slide`` only).
        stride: step between windows, side or ``(height, width)``; defaults to ``crop_size``
            (no overlap).
        scales: the image is resized by each factor; logits are averaged at full resolution.
        flip: also run every scale on the mirrored image (horizontal flip TTA).
        batch_size: windows per forward pass in ``slide`` mode (from one row of windows).
    """

    def __init__(
        self,
        *,
        mode: str = "whole",
        crop_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        batch_size: int = 1,
    ) -> None:
        if mode not in MODES:
            raise UserError(f"eval.mode={mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.crop_size = None if crop_size is None else size_pair(crop_size, name="eval.crop_size")
        self.stride = self.crop_size if stride is None else size_pair(stride, name="eval.stride")
        if mode == "slide" and self.crop_size is None:
            raise UserError("eval.mode=slide needs eval.crop_size")
        self.scales = tuple(
            float(s) for s in (scales if isinstance(scales, Sequence) else [scales])
        )
        if not self.scales or min(self.scales) <= 0:
            raise UserError(
                f"eval.scales={list(scales)!r} must be a non-empty list of positive factors"
            )
        self.flip = bool(flip)
        if int(batch_size) < 1:
            raise UserError(f"eval.batch_size={batch_size} must be at least 1")
        self.batch_size = int(batch_size)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Inference:
        """Builds from a mapping such as a config's ``eval`` node; other keys are ignored."""
        keys = ("mode", "crop_size", "stride", "scales", "flip", "batch_size")
        return cls(**{k: options[k] for k in keys if k in options})

    @property
    def views(self) -> list[tuple[float, bool]]:
        """The (scale, mirrored) views averaged for each image."""
        return [(s, f) for s in self.scales for f in ((False, True) if self.flip else (False,))]

    @property
    def plain(self) -> bool:
        """One whole-image pass at scale 1: the network's output is the answer."""
        return self.mode == "whole" and self.views == [(1.0, False)]

    def __repr__(self) -> str:
        slide = (
            f", crop_size={self.crop_size}, stride={self.stride}" if self.mode == "slide" else ""
        )
        return f"Inference(mode={self.mode}{slide}, scales={list(self.scales)}, flip={self.flip})"

    @torch.no_grad()
    def logits(
        self, model: nn.Module, images: torch.Tensor, *, autocast: torch.autocast | None = None
    ) -> torch.Tensor:
        """Logits (N, C, H, W) for images (N, 3, H, W), averaged over the views.

        The plain mode returns the network's output as is (its dtype under autocast); every
        other mode returns float32.
        """
        if _gives_labels(model):
            raise UserError(
                f"{_name(model)} was exported with outputs=labels, so it gives no logits "
                "(class probabilities need them); export it with outputs=logits"
            )
        if self.plain:
            return _forward(model, images, autocast)
        return torch.stack([self._image_logits(model, img[None], autocast) for img in images])

    @torch.no_grad()
    def predict(
        self, model: nn.Module, images: torch.Tensor, *, autocast: torch.autocast | None = None
    ) -> torch.Tensor:
        """Labels (N, H, W): the argmax of the averaged logits, one image at a time so that only
        one image's full-resolution logits are ever held (except in plain mode)."""
        if _gives_labels(model):  # the argmax is in the graph
            if not self.plain:
                raise UserError(
                    f"{_name(model)} was exported with outputs=labels, so {self} cannot run it: "
                    "sliding windows, scales and flips average logits; use eval.mode=whole "
                    "eval.scales=[1.0] eval.flip=false, or export with outputs=logits"
                )
            return _forward(model, images, None)
        if self.plain:
            return _forward(model, images, autocast).argmax(1)
        return torch.stack(
            [self._image_logits(model, img[None], autocast).argmax(0) for img in images]
        )

    def _image_logits(self, model: nn.Module, image: torch.Tensor, autocast) -> torch.Tensor:
        height, width = image.shape[-2:]
        canvas = _Canvas(height, width)
        for scale, mirrored in self.views:
            x = image.flip(-1) if mirrored else image
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            if size != (height, width):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            writer = _ViewWriter(canvas, size, mirrored, image.device)
            if self.mode == "whole":
                writer(_forward(model, x, autocast)[0].float(), 0, size[0])
            else:
                self._slide(model, x, autocast, writer)
        views = len(self.views)
        return canvas.acc if views == 1 else canvas.acc.div_(views)

    def _slide(self, model: nn.Module, x: torch.Tensor, autocast, writer: _ViewWriter) -> None:
        """Sums window logits into a band of rows; hands rows to ``writer`` once final."""
        h, w = x.shape[-2:]
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        ys, xs = _starts(h, ch, self.stride[0]), _starts(w, cw, self.stride[1])
        # The windows form a grid, so the number covering pixel (y, x) is rows(y) * cols(x).
        rows = torch.zeros(h, device=x.device)
        cols = torch.zeros(w, device=x.device)
        for y in ys:
            rows[y : y + ch] += 1
        for x0 in xs:
            cols[x0 : x0 + cw] += 1
        # Band row j holds source row lo + j. When a window row is done, the rows above the next
        # one are final; the writer keeps at most one of them (the upper tap of the next output
        # row), so one window row plus one row is all the band ever holds.
        band: torch.Tensor | None = None
        lo = normalised = 0  # rows below `normalised` are averaged already
        for k, y in enumerate(ys):
            for b in range(0, len(xs), self.batch_size):
                chunk = xs[b : b + self.batch_size]
                crops = torch.cat([x[..., y : y + ch, x0 : x0 + cw] for x0 in chunk])
                out = _forward(model, crops, autocast)
                if band is None:
                    band = out.new_zeros((out.shape[1], ch + 1, w), dtype=torch.float32)
                for j, x0 in enumerate(chunk):
                    band[:, y - lo : y - lo + ch, x0 : x0 + cw] += out[j].float()
                del out
            final = ys[k + 1] if k + 1 < len(ys) else h  # no later window touches rows < final
            band[:, normalised - lo : final - lo] /= rows[normalised:final, None] * cols
            normalised = final
            new_lo = writer(band, lo, final)
            _shift_up(band, new_lo - lo, filled=y + ch - lo)
            lo = new_lo


def _gives_labels(model: nn.Module) -> bool:
    """Whether ``model`` outputs label maps, not logits (an ONNX file exported with
    ``outputs=labels``: ``fcnseg.deploy.OnnxModel.outputs``)."""
    return getattr(model, "outputs", "logits") == "labels"


def _name(model: nn.Module) -> str:
    return str(getattr(model, "path", type(model).__name__))


def _forward(model: nn.Module, x: torch.Tensor, autocast) -> torch.Tensor:
    with autocast or contextlib.nullcontext():
        return model(x)


def _shift_up(band: torch.Tensor, shift: int, *, filled: int) -> None:
    """Moves rows ``[shift, filled)`` of ``band`` to the top and zeroes the rest, in place and
    without a temporary: blocks of ``shift`` rows never overlap their destination."""
    if shift <= 0:
        return
    keep = max(filled - shift, 0)
    for start in range(0, keep, shift):
        n = min(shift, keep - start)
        band[:, start : start + n] = band[:, start + shift : start + shift + n]
    band[:, keep:] = 0


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Window origins covering ``[0, size)``; the last window is flush with the border."""
    n = max(math.ceil((size - crop) / stride), 0) + 1
    return sorted({min(i * stride, size - crop) for i in range(n)})


def _taps(out_size: int, in_size: int, mirrored: bool, device: torch.device):
    """Bilinear resampling taps as ``F.interpolate(mode="bilinear", align_corners=False)``
    computes them: source ``(dst + 0.5) * in / out - 0.5``, clamped at 0. ``mirrored`` maps
    output pixel ``i`` to the source's pixel ``out - 1 - i`` (undoing a horizontal flip)."""
    # In float32, as PyTorch computes them, so that the two agree to rounding.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    frac = (src - i0).clamp(0, 1)
    if mirrored:
        i0, i1, frac = i0.flip(0), i1.flip(0), frac.flip(0)
    return i0.to(device), i1.to(device), frac.to(device)


class _Canvas:
    """The one full-resolution float32 accumulator of an image, allocated on first use."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.acc: torch.Tensor | None = None

    def get(self, like: torch.Tensor) -> torch.Tensor:
        if self.acc is None:
            self.acc = like.new_zeros((like.shape[0], self.height, self.width), dtype=torch.float32)
        return self.acc


class _ViewWriter:
    """Resamples one view's logits, given as bands of rows, into the canvas.

    Called with ``(band, lo, final)``: ``band`` holds the view's averaged logits for source
    rows ``[lo, lo + band rows)``, of which those below ``final`` are complete. Adds every
    output row whose two source rows are complete and returns the lowest source row still
    needed, so that the caller can drop the rows above it.
    """

    def __init__(
        self, canvas: _Canvas, size: tuple[int, int], mirrored: bool, device: torch.device
    ) -> None:
        self.canvas = canvas
        self.identity = size == (canvas.height, canvas.width)
        self.y0, self.y1, self.fy = _taps(canvas.height, size[0], False, device)
        self.x0, self.x1, self.fx = _taps(canvas.width, size[1], mirrored, device)
        self.next_row = 0

    def __call__(self, band: torch.Tensor, lo: int, final: int) -> int:
        acc = self.canvas.get(band)
        end = int(torch.searchsorted(self.y1, torch.tensor(final, device=self.y1.device)))
        for r0 in range(self.next_row, end, ROWS_PER_CHUNK):
            rows = slice(r0, min(r0 + ROWS_PER_CHUNK, end))
            top = band.index_select(1, self.y0[rows] - lo)
            if self.identity:  # pure copy (or mirror): exact, no interpolation arithmetic
                acc[:, rows] += top.index_select(2, self.x0)
                continue
            v = torch.lerp(top, band.index_select(1, self.y1[rows] - lo), self.fy[rows, None])
            acc[:, rows] += torch.lerp(
                v.index_select(2, self.x0), v.index_select(2, self.x1), self.fx
            )
        self.next_row = end
        return int(self.y0[end]) if end < len(self.y0) else final
