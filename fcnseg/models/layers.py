"""Building blocks shared by the heads: bilinear kernels, coordinate maps and alignment."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.utils.validate import size_pair


@dataclass(frozen=True)
class FeatureInfo:
    """Where a feature map sits relative to the input image.

    A cell ``y`` of the map is centred on input pixel ``stride * y + origin`` (Caffe's "coord map").
    Heads use it to compute crop offsets instead of hard-coding them.
    """

    channels: int
    stride: float
    origin: float = 0.0


def coord_step(stride: float, origin: float, layer: nn.Module) -> tuple[float, float]:
    """Composes the coordinate map (stride, origin) with one more conv or pooling layer."""
    if isinstance(layer, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
        k, s, p, d = (
            size_pair(getattr(layer, a, 1), name=a, minimum=0)[0]
            for a in ("kernel_size", "stride", "padding", "dilation")
        )
        extent = d * (k - 1) + 1
        return stride * s, origin + stride * ((extent - 1) / 2 - p)
    return stride, origin


def coord_map(
    layers: Iterable[nn.Module], stride: float = 1.0, origin: float = 0.0
) -> tuple[float, float]:
    """The (stride, origin) of the output of ``layers`` applied in order."""
    for layer in layers:
        stride, origin = coord_step(stride, origin, layer)
    return stride, origin


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """Weights of a (channels, channels, k, k) transposed conv that upsamples bilinearly.

    Same construction as the reference FCN's ``upsample_filt``: each channel maps onto itself.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt = 1 - (og - center).abs() / factor
    filt2d = (filt[:, None] * filt[None, :]).float()
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = filt2d
    return weight


def align(x: torch.Tensor, offset: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Window of ``x`` of ``size`` starting at ``offset`` (the reference nets' Crop layer).

    A negative offset or a window running past the border pads with zeros, so any backbone
    geometry works; for the FCN alignment it is always a pure crop, returned as a view.
    """
    (oy, ox), (h, w) = offset, size
    if oy >= 0 and ox >= 0 and oy + h <= x.shape[-2] and ox + w <= x.shape[-1]:
        return x[..., oy : oy + h, ox : ox + w]
    return F.pad(x, (-ox, ox + w - x.shape[-1], -oy, oy + h - x.shape[-2]))


class FullyConnectedConv2d(nn.Conv2d):
    """A convolution that stands for a fully connected layer (VGG's fc6: a 7x7 kernel over 512
    channels), with ``nn.Conv2d``'s parameters, state dict and results.

    On the CPU it runs as one matrix product over the unfolded windows: oneDNN's direct
    convolution is slow for a large kernel on a small map (fc6 on a 12x12 pool5 map: 0.66 s
    against 0.22 s as a matrix product, one core; docs/benchmarks.md). Elsewhere, and when the
    unfolded windows would pass ``max_unfold_bytes``, it is the ordinary convolution.
    """

    max_unfold_bytes = 1 << 30

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or self.groups != 1
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
            or not self.weight.is_contiguous()  # channels-last weights would be copied
        ):
            return super().forward(x)
        n, _, h, w = x.shape
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        (ph, pw), (dh, dw) = self.padding, self.dilation
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        unfold_bytes = n * oh * ow * self.weight[0].numel() * x.element_size()
        if oh < 1 or ow < 1 or unfold_bytes > self.max_unfold_bytes:
            return super().forward(x)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        out = F.linear(cols.transpose(1, 2), self.weight.flatten(1), self.bias)  # (N, L, C)
        # (N, L, C) is the channels-last layout of (N, C, oh, ow): a view, then the input's layout.
        out = out.view(n, oh, ow, -1).permute(0, 3, 1, 2)
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out.contiguous(
            memory_format=torch.channels_last if nhwc else torch.contiguous_format
        )


# ---------------------------------------------------------------------------- portable unpooling
# ``nn.MaxUnpool2d`` scatters every value to its flat index; exported, that is ScatterND fed by
# MaxPool's second output, and OpenCV's DNN module (4.x) reads neither. SegNet's and DeconvNet's
# poolings are all 2x2 windows at stride 2 (ceil mode), so the same result can be written with
# operators every runtime has: where in its window each maximum lies (0 to 3, row-major) is
# found by comparing the input with its upsampled maximum, and unpooling puts each value back
# at that place with one-hot transposed convolutions. Both are exact: comparisons and products
# by 0 and 1 round nothing.
#: Depthwise 2x2 kernels, one per window position (row-major), 1 at that position.
_WINDOW_POSITIONS = torch.eye(4).view(4, 1, 1, 2, 2)


def _window_position_kernel(channels: int, position: int, dtype: torch.dtype) -> torch.Tensor:
    """A depthwise (channels, 1, 2, 2) kernel that is 1 at ``position`` of the 2x2 window."""
    return _WINDOW_POSITIONS[position].to(dtype).expand(channels, 1, 2, 2)


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Each cell repeated over a 2x2 block: a depthwise transposed convolution by ones (exact,
    no two blocks overlap), cheaper to export than ``F.interpolate``."""
    ones = torch.ones(1, 1, 2, 2, dtype=x.dtype, device=x.device).expand(x.shape[1], 1, 2, 2)
    return F.conv_transpose2d(x, ones, stride=2, groups=x.shape[1])


def max_pool2d_window_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 max pooling at stride 2 in ceil mode, and where in its window each maximum lies.

    The second tensor stands for ``MaxPool2d(return_indices=True)``'s flat indices in a form
    without integer indexing: the position (0 to 3, row-major) of the maximum inside its 2x2
    window, in ``x``'s dtype. Of equal maxima the first in row-major order is taken, as
    PyTorch's pooling takes it (NaN inputs aside). ``max_unpool2d_window_argmax`` reads it.
    """
    height, width = x.shape[-2:]
    channels = x.shape[1]
    pooled = F.max_pool2d(x, 2, stride=2, ceil_mode=True)
    upsampled = _upsample2x(pooled)[..., :height, :width]
    # 1 where an input equals its window's maximum; the cells a ceil-mode window has past the
    # border are 0, never a maximum.
    equal = (x == upsampled).to(x.dtype)
    equal = F.pad(equal, (0, 2 * pooled.shape[-1] - width, 0, 2 * pooled.shape[-2] - height))
    hit = [
        F.conv2d(equal, _window_position_kernel(channels, p, x.dtype), stride=2, groups=channels)
        for p in range(4)
    ]
    # The first hit in row-major order: position p counts where no earlier one hit (and the
    # last where none of the others did).
    none_before = [1 - hit[0]]
    for p in (1, 2):
        none_before.append(none_before[-1] * (1 - hit[p]))
    where = hit[1] * none_before[0] + 2 * hit[2] * none_before[1] + 3 * none_before[2]
    return pooled, where


def max_unpool2d_window_argmax(
    values: torch.Tensor, where: torch.Tensor, output_size: Sequence[int]
) -> torch.Tensor:
    """``nn.MaxUnpool2d(2, stride=2)``: each value put back where ``max_pool2d_window_argmax``
    found its window's maximum, zeros elsewhere, cropped to ``output_size`` (H, W)."""
    height, width = output_size[-2], output_size[-1]
    # Every output cell sees its window's value and position; it keeps the value where the
    # position is its own (row parity * 2 + column parity).
    upsampled = _upsample2x(values)[..., :height, :width]
    position = _upsample2x(where)[..., :height, :width]
    rows = torch.arange(height, device=values.device) % 2
    cols = torch.arange(width, device=values.device) % 2
    own = (rows[:, None] * 2 + cols[None, :]).to(values.dtype)
    return upsampled * (position == own).to(values.dtype)
