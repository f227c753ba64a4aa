"""FCN-32s/16s/8s heads (Long, Shelhamer & Darrell, 2015).

The head scores the coarsest feature map (``fc7``) with a 1x1 ``score_fr``, then repeatedly
upsamples by 2 with a bilinear-initialised transposed convolution and adds the score of a finer
skip feature (``pool4``, then ``pool3``), and finally upsamples to the input resolution. Each
map is cropped to the next one; the crop offsets are derived from the backbone's coordinate maps
(``FeatureInfo``), which for the FCN-aligned VGG reproduce the reference nets' values exactly:
FCN-32s 19; FCN-16s 5 and 27; FCN-8s 5, 9 and 31.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fcnseg.models.layers import FeatureInfo, align, upsample_coords, upsample_layer


class FCNHead(nn.Module):
    """FCN decoder with skip connections from finer features.

    Args:
        feature_info: the backbone's ``feature_info``; must describe ``top`` and each skip.
        num_classes: number of output classes.
        skips: finer features to fuse, coarse to fine (``()`` 32s, ``("pool4",)`` 16s,
            ``("pool4", "pool3")`` 8s).
        top: the coarsest feature to score.
        learnable_upsample: train the transposed convolutions (the paper froze the last one
            at bilinear; the reference nets learn the 2x ones).
        skip_scales: fixed factors applied to skip features before scoring (the at-once
            FCN-8s scales pool4 by 0.01 and pool3 by 1e-4).
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
        self.score_fr = nn.Conv2d(feature_info[top].channels, num_classes, 1)
        stride, origin = feature_info[top].stride, feature_info[top].origin
        self.crop_offsets: dict[str, int] = {}
        previous = "score_fr"
        for name in self.skips:
            info = feature_info[name]
            factor = round(stride / info.stride)
            up_name = "upscore2" if previous == "score_fr" else f"upscore_{previous}"
            self.add_module(up_name, upsample_layer(num_classes, factor, learnable_upsample))
            stride, origin = upsample_coords(stride, origin, factor)
            # Crop the finer score map so its cells sit under the upsampled coarse ones.
            self.crop_offsets[name] = round((origin - info.origin) / info.stride)
            self.add_module(f"score_{name}", nn.Conv2d(info.channels, num_classes, 1))
            previous = name
        factor = round(stride)
        self.final_upsample = f"upscore{factor}" if self.skips else "upscore"
        self.add_module(self.final_upsample, upsample_layer(num_classes, factor, learnable_upsample))
        stride, origin = upsample_coords(stride, origin, factor)
        self.crop_offsets["input"] = round(-origin)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the paper zero-initialises every score layer
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Mapping[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        score = self.score_fr(features[self.top])
        previous = "score_fr"
        for name in self.skips:
            up_name = "upscore2" if previous == "score_fr" else f"upscore_{previous}"
            score = getattr(self, up_name)(score)
            feat = features[name]
            if name in self.skip_scales:
                feat = feat * self.skip_scales[name]
            skip = getattr(self, f"score_{name}")(feat)
            off = self.crop_offsets[name]
            score = score + align(skip, (off, off), score.shape[-2:])
            previous = name
        score = getattr(self, self.final_upsample)(score)
        off = self.crop_offsets["input"]
        return align(score, (off, off), size)


def fcn32s(feature_info, num_classes: int, *, learnable_upsample: bool = True) -> FCNHead:
    """FCN-32s: score fc7, upsample 32x."""
    return FCNHead(feature_info, num_classes, skips=(), learnable_upsample=learnable_upsample)


def fcn16s(feature_info, num_classes: int, *, learnable_upsample: bool = True) -> FCNHead:
    """FCN-16s: fuse pool4 at stride 16, upsample 16x."""
    return FCNHead(feature_info, num_classes, skips=("pool4",), learnable_upsample=learnable_upsample)


def fcn8s(feature_info, num_classes: int, *, learnable_upsample: bool = True) -> FCNHead:
    """FCN-8s: fuse pool4 and pool3, upsample 8x."""
    return FCNHead(
        feature_info, num_classes, skips=("pool4", "pool3"), learnable_upsample=learnable_upsample
    )
