"""FCN-32s/16s/8s heads (Long, Shelhamer & Darrell, 2015), staged and at-once.

The head scores the coarsest feature map (``fc7``) with a 1x1 ``score_fr``, then repeatedly
upsamples by 2 with a bilinear-initialised transposed convolution and adds the score of a finer
skip feature (``pool4``, then ``pool3``), and finally upsamples to the input resolution. Each
map is cropped to the next one; the crop offsets are derived from the backbone's coordinate maps
(``FeatureInfo``), which for the FCN-aligned VGG reproduce the reference nets' values exactly:
FCN-32s 19; FCN-16s 5 and 27; FCN-8s 5, 9 and 31.

An upsampling by f uses a kernel of 2f (the reference VGG nets') where that puts the upsampled
cells on whole cells of the map it is cropped to, else a kernel of 2f - 1, which shifts the
result by half an output cell: the reference FCN-AlexNet's 63 for its 32x upsampling, and what
makes a ResNet's maps (all centred on the input grid) fuse without a half-cell misalignment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fcnseg.errors import UserError
from fcnseg.models.layers import FeatureInfo, align, bilinear_kernel

# The at-once FCN-8s scales the skips so that their scores start small next to fc7's: all three
# are learned together from the start instead of stage by stage (voc-fcn8s-atonce/net.py).
ATONCE_SKIP_SCALES = {"pool4": 0.01, "pool3": 1e-4}


class FCNHead(nn.Module):
    """FCN decoder with skip connections from finer features.

    Args:
        feature_info: the backbone's ``feature_info``; must describe ``top`` and each skip.
        num_classes: number of output classes.
        skips: finer features to fuse, coarse to fine (``()`` 32s, ``("pool4",)`` 16s,
            ``("pool4", "pool3")`` 8s).
        top: the coarsest feature to score.
        learnable_upsample: train the transposed convolutions (the reference nets keep them
            fixed at bilinear interpolation: Caffe's ``lr_mult: 0``).
        skip_scales: fixed factors applied to skip features before scoring (the at-once
            FCN-8s scales pool4 by 0.01 and pool3 by 1e-4).

    Attributes:
        crop_offsets: per skip feature, and ``"input"`` for the final crop, the offset in cells
            of the map cropped.
        upsample_kernels: kernel size of each transposed convolution, by layer name.
    """

    def __init__(
        self,
        feature_info: Mapping[str, FeatureInfo],
        num_classes: int,
        *,
        skips: Sequence[str] = ("pool4", "pool3"),
        top: str = "fc7",
        learnable_upsample: bool = True,
        skip_scales: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.skips = tuple(skips)
        self.top = top
        self.skip_scales = dict(skip_scales or {})
        missing = [name for name in (top, *self.skips) if name not in feature_info]
        if missing:
            raise UserError(
                f"the FCN head fuses {', '.join((top, *self.skips))} but the backbone gives "
                f"{', '.join(feature_info) or 'nothing'} (missing {', '.join(missing)}); use a "
                f"backbone made for FCN heads (vgg16, vgg19, alexnet, resnet50, vgg_tiny, ...)"
            )
        self.score_fr = nn.Conv2d(feature_info[top].channels, num_classes, 1)
        stride, origin = feature_info[top].stride, feature_info[top].origin
        self.crop_offsets: dict[str, int] = {}
        self.upsample_kernels: dict[str, int] = {}
        self.up_names: list[str] = []
        previous = "score_fr"
        for name in self.skips:
            info = feature_info[name]
            factor = round(stride / info.stride)
            up_name = "upscore2" if previous == "score_fr" else f"upscore_{previous}"
            # Crop the finer score map so its cells sit under the upsampled coarse ones.
            kernel, (stride, origin), offset = _upsampling(stride, origin, factor, info)
            self.add_module(
                up_name, _upsample_layer(num_classes, factor, kernel, learnable_upsample)
            )
            self.crop_offsets[name] = offset
            self.upsample_kernels[up_name] = kernel
            self.up_names.append(up_name)
            self.add_module(f"score_{name}", nn.Conv2d(info.channels, num_classes, 1))
            previous = name
        factor = round(stride)
        self.final_upsample = f"upscore{factor}" if self.skips else "upscore"
        kernel, _, offset = _upsampling(stride, origin, factor, FeatureInfo(0, 1.0, 0.0))
        self.add_module(
            self.final_upsample, _upsample_layer(num_classes, factor, kernel, learnable_upsample)
        )
        # Here the upsampled map is the one cropped: to the input's pixel 0.
        self.crop_offsets["input"] = -offset
        self.upsample_kernels[self.final_upsample] = kernel
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the paper zero-initialises every score layer
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Mapping[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        score = self.score_fr(features[self.top])
        for name, up_name in zip(self.skips, self.up_names):
            score = getattr(self, up_name)(score)
            feat = features[name]
            if name in self.skip_scales:
                feat = feat * self.skip_scales[name]
            skip = getattr(self, f"score_{name}")(feat)
            off = self.crop_offsets[name]
            score = score + align(skip, (off, off), score.shape[-2:])
        score = getattr(self, self.final_upsample)(score)
        off = self.crop_offsets["input"]
        return align(score, (off, off), size)


def _upsample_layer(channels: int, factor: int, kernel: int, learnable: bool) -> nn.ConvTranspose2d:
    """Transposed conv (stride ``factor``, no bias) initialised to bilinear interpolation."""
    layer = nn.ConvTranspose2d(channels, channels, kernel, stride=factor, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, kernel))
    layer.weight.requires_grad_(learnable)
    return layer


def _upsampling(
    stride: float, origin: float, factor: int, target: FeatureInfo
) -> tuple[int, tuple[float, float], int]:
    """Kernel, output coordinate map and crop offset of an upsampling by ``factor`` of a map
    at (stride, origin) onto the grid of ``target``.

    A kernel-k, stride-f transposed convolution's output cell y sits at ``origin + stride/f *
    (y - (k - 1) / 2)``: the crop offset onto ``target`` is whole for k = 2f or 2f - 1
    depending on the origins. The first whole one is taken; if neither is, 2f with the offset
    rounded.
    """
    candidates = []
    for kernel in (2 * factor, 2 * factor - 1):
        out_stride = stride / factor
        out_origin = origin - out_stride * (kernel - 1) / 2
        offset = (out_origin - target.origin) / target.stride
        if abs(offset - round(offset)) < 1e-6:
            return kernel, (out_stride, out_origin), round(offset)
        candidates.append((kernel, (out_stride, out_origin), round(offset)))
    return candidates[0]


def fcn32s(feature_info, num_classes: int, *, learnable_upsample: bool = True) -> FCNHead:
    """FCN-32s: score fc7, upsample 32x."""
    return FCNHead(feature_info, num_classes, skips=(), learnable_upsample=learnable_upsample)


def fcn16s(feature_info, num_classes: int, *, learnable_upsample: bool = True) -> FCNHead:
    """FCN-16s: fuse pool4 at stride 16, upsample 16x."""
    return FCNHead(
        feature_info, num_classes, skips=("pool4",), learnable_upsample=learnable_upsample
    )


def fcn8s(feature_info, num_classes: int, *, learnable_upsample: bool = True) -> FCNHead:
    """FCN-8s: fuse pool4 and pool3, upsample 8x (trained in stages from FCN-16s)."""
    return FCNHead(
        feature_info, num_classes, skips=("pool4", "pool3"), learnable_upsample=learnable_upsample
    )


def fcn8s_atonce(
    feature_info,
    num_classes: int,
    *,
    learnable_upsample: bool = True,
    pool4_scale: float = ATONCE_SKIP_SCALES["pool4"],
    pool3_scale: float = ATONCE_SKIP_SCALES["pool3"],
) -> FCNHead:
    """FCN-8s trained all at once: pool4 scaled by 0.01 and pool3 by 1e-4 before scoring.

    The same layers (and names) as ``fcn8s``; only the fixed skip scaling differs.
    """
    return FCNHead(
        feature_info,
        num_classes,
        skips=("pool4", "pool3"),
        learnable_upsample=learnable_upsample,
        skip_scales={"pool4": pool4_scale, "pool3": pool3_scale},
    )
