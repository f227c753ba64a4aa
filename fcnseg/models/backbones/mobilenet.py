"""MobileNetV2 for the FCN heads, with the ImageNet classifier converted to a convolution.

torchvision's MobileNetV2 layers, unchanged and under torchvision's names (``features.0`` ...
``features.18``, ``classifier.1``), so that its ImageNet state dict loads as it is. The heads
get the maps they ask for under VGG's names:

- ``pool3``: the output of ``features.6``, the last inverted residual block at stride 8
  (32 channels);
- ``pool4``: the output of ``features.13``, the last block at stride 16 (96 channels);
- ``fc7``: the top at stride 32. With ``fc=True`` (the default, as for ResNet) it is the
  ImageNet classifier (dropout, then Linear 1280 -> 1000) as a 1x1 convolution on
  ``features.18``'s map, scoring the 1000 classes at every cell; with ``fc=False`` it is that
  1280-channel map itself.

Every convolution is padded by half its kernel, so every map is centred on the input's grid
(origin 0) and any input size works, odd or tiny. Sandler et al., "MobileNetV2: Inverted
Residuals and Linear Bottlenecks", CVPR 2018.
"""

from __future__ import annotations

import torch
from torch import nn

from fcnseg.models.backbones.weights import load_by_names, torchvision_builder
from fcnseg.models.convert import linear_to_conv
from fcnseg.models.layers import FeatureInfo, coord_map

# The feature each head asks for -> the index in ``features`` whose output it is.
FEATURES = {"pool3": 6, "pool4": 13, "fc7": 18}


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 as a dense feature extractor: ``pool3``, ``pool4``, ``fc7``.

    Args:
        fc: keep the ImageNet classifier as a 1x1 convolution on top (``fc7`` = ImageNet
            scores); without it ``fc7`` is ``features.18``'s 1280-channel map.
    """

    out_features = ("pool3", "pool4", "fc7")

    def __init__(self, *, fc: bool = True) -> None:
        super().__init__()
        import torchvision  # here: importing it costs a second that only some backbones need

        net = torchvision.models.mobilenet_v2(weights=None)
        self.features = net.features
        self.classifier: nn.Sequential | None = None
        if fc:
            drop, linear = net.classifier
            # torchvision drops whole channels of the pooled vector; on the map that is one
            # draw per channel and image: Dropout2d. Index 1 keeps torchvision's tensor names.
            self.classifier = nn.Sequential(nn.Dropout2d(drop.p), linear_to_conv(linear))
        self.feature_info: dict[str, FeatureInfo] = {}
        for name, index in FEATURES.items():
            # A block's residual adds its input, of the same geometry: the convolutions tell.
            convs = [m for m in self.features[: index + 1].modules() if isinstance(m, nn.Conv2d)]
            self.feature_info[name] = FeatureInfo(convs[-1].out_channels, *coord_map(convs))
        if self.classifier is not None:
            info = self.feature_info["fc7"]
            channels = self.classifier[1].out_channels
            self.feature_info["fc7"] = FeatureInfo(channels, info.stride, info.origin)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        wanted = {index: name for name, index in FEATURES.items()}
        feats = {}
        for index, block in enumerate(self.features):
            x = block(x)
            if index in wanted:
                feats[wanted[index]] = x
        if self.classifier is not None:
            feats["fc7"] = self.classifier(feats["fc7"])
        return feats

    def load_torchvision(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads a torchvision ``mobilenet_v2`` state dict, every tensor checked by name and
        shape: the names are the same, ``classifier.1``'s Linear weight becomes the 1x1
        convolution's (or is dropped with ``fc=False``)."""
        load_by_names(
            self,
            state_dict,
            dropped=lambda key: self.classifier is None and key.startswith("classifier."),
        )


mobilenet_v2 = torchvision_builder(
    "mobilenet_v2",
    lambda fc: MobileNetV2(fc=fc),
    """MobileNetV2 (Sandler et al.): skips from ``features.6`` (stride 8) and ``features.13``
    (stride 16); ``fc7`` the ImageNet classifier as a 1x1 convolution (``fc=False``: the
    1280-channel map). ``frozen_bn``: its 52 BatchNorm layers frozen once the weights are in.""",
)
