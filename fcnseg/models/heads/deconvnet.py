"""DeconvNet's decoder (Noh, Hong & Han, 2015): a deconvolution network mirroring VGG-16.

The encoder keeps VGG-16's fully-connected layers as convolutions (fc6 7x7, fc7 1x1), so its
top sees a 7x7 window of pool5, as the ImageNet classifier did. The decoder first undoes fc6
with a 7x7 transposed convolution (``fc6_deconv``, back to pool5's size), then alternates
max-unpooling (values back at the argmax positions the encoder recorded) with 3x3 transposed
convolutions that densify the sparse maps, and scores classes with a 1x1 convolution. The
layer names are those of the reference ``DeconvNet_inference_deploy.prototxt``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from fcnseg.errors import UserError
from fcnseg.models.heads.segnet import (
    VGG16_DEPTHS,
    UnpoolingHead,
    conv_block,
    head_builder,
)
from fcnseg.models.layers import FeatureInfo, align


class DeconvNetHead(UnpoolingHead):
    """``fc6_deconv``, then unpooling stages mirroring the encoder, then ``seg_score``.

    Decoder stage N has as many 3x3 transposed convolutions as encoder stage N; all keep the
    width of ``poolN`` except the last, which narrows to the width of ``pool(N-1)``.

    Args:
        feature_info: the backbone's; must describe ``fc7`` and ``pool1`` ... ``poolN`` with
            their indices (a VGG built with ``indices=true, fc=true``).
        num_classes: number of output classes.
        depths: transposed convolutions per decoder stage, finest first (VGG-16's by default).
        batch_norm: BatchNorm after every transposed convolution (the paper's choice).
    """

    # What build_model builds the backbone with: an encoder whose poolings return their
    # indices, with fc6/fc7, where the decoder starts.
    backbone_options: ClassVar[Mapping[str, Any]] = MappingProxyType({"indices": True, "fc": True})

    def __init__(
        self,
        feature_info: Mapping[str, FeatureInfo],
        num_classes: int,
        *,
        depths: Sequence[int] = VGG16_DEPTHS,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(feature_info, depths, "deconvnet")
        if "fc7" not in feature_info:
            raise UserError(
                "head deconvnet starts from the backbone's fc7, which this backbone does not "
                "compute; set backbone.fc=true"
            )
        top = feature_info[self.pools[-1]].channels
        fc6_deconv = nn.ConvTranspose2d(feature_info["fc7"].channels, top, 7)
        self.fc6_deconv = nn.Sequential(
            OrderedDict(conv_block(fc6_deconv, ("deconv", "bn", "relu"), batch_norm=batch_norm))
        )

        def stage(s: int, width: int, narrow: int | None) -> list[tuple[str, nn.Module]]:
            out = width if narrow is None else narrow
            layers: list[tuple[str, nn.Module]] = []
            for i in range(1, depths[s - 1] + 1):  # deconv5_1, deconv5_2, deconv5_3
                deconv = nn.ConvTranspose2d(
                    width, out if i == depths[s - 1] else width, 3, padding=1
                )
                names = (f"deconv{s}_{i}", f"debn{s}_{i}", f"derelu{s}_{i}")
                layers += conv_block(deconv, names, batch_norm=batch_norm)
            return layers

        self.add_stages(feature_info, stage)
        self.seg_score = nn.Conv2d(feature_info["pool1"].channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):  # the reference's gaussian filler
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: Mapping[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.fc6_deconv(features["fc7"])
        # The valid 7x7 transposed conv restores pool5's size; for a pool5 smaller than 7 the
        # encoder padded it, centred (vgg.fc6_padding), so a centred crop removes it.
        h, w = features[self.pools[-1]].shape[-2:]
        x = align(x, ((x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2), (h, w))
        return self.seg_score(self.decode(x, features, size))


deconvnet = head_builder(
    DeconvNetHead,
    "deconvnet",
    "DeconvNet: fc6-deconv, five unpooling + transposed-convolution stages, a 1x1 scorer.",
)
