"""ResNet backbones for the FCN heads, with the ImageNet classifier converted to a convolution.

torchvision's ResNet layers, unchanged (so its ImageNet weights load as they are), returning the
maps the FCN heads ask for under VGG's names: ``pool3`` is ``layer2``'s output (stride 8),
``pool4`` is ``layer3``'s (stride 16) and ``fc7`` the top of the net (stride 32). The top is the
final fully connected layer converted to a 1x1 convolution (``fc=True``, the default: on
``layer4``'s map it scores the 1000 ImageNet classes at every cell, the classifier the
pretrained weights come with), or ``layer4``'s map itself (``fc=False``: 2048 channels, 512 in
ResNet-18 and -34, whose basic blocks end in a 3x3 convolution rather than a 1x1 expansion).

Every convolution and pooling is padded by half its kernel, so every map is centred on the
input's grid: cell ``y`` of a stride-``s`` map sits on input pixel ``s * y`` (origin 0). The
heads derive their crop offsets from these coordinate maps; a ResNet needs no padding of 100.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from fcnseg.errors import UserError
from fcnseg.models.backbones.weights import load_by_names, torchvision_builder
from fcnseg.models.convert import linear_to_conv
from fcnseg.models.layers import FeatureInfo, coord_map

# The feature each head asks for -> the torchvision stage that computes it.
FEATURES = {"pool3": "layer2", "pool4": "layer3", "fc7": "layer4"}


class ResNet(nn.Module):
    """A torchvision ResNet as a dense feature extractor returning ``pool3``, ``pool4``, ``fc7``.

    Args:
        arch: a torchvision ResNet builder name (``resnet18`` ... ``resnet101``, ...): basic
            blocks or bottlenecks alike, a block's last convolution gives its channels.
        fc: keep the classifier as a 1x1 convolution on top (``fc7`` = ImageNet scores);
            without it ``fc7`` is ``layer4``'s map.
    """

    out_features = ("pool3", "pool4", "fc7")

    def __init__(self, arch: str = "resnet50", *, fc: bool = True) -> None:
        super().__init__()
        import torchvision  # here: importing it costs a second that only ResNets need

        build = getattr(torchvision.models, arch, None)
        if not arch.startswith(("resnet", "wide_resnet", "resnext")) or build is None:
            raise UserError(f"backbone arch={arch!r} is not a torchvision ResNet")
        net = build(weights=None)
        self.arch = arch
        self.stem = nn.Sequential(
            OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool)
        )
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.fc = linear_to_conv(net.fc) if fc else None
        self.feature_info: dict[str, FeatureInfo] = {}
        layers = [net.conv1, net.maxpool]
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for block in getattr(self, name):
                # The main branch stands for the block: the shortcut has the same geometry.
                layers += [m for m in block.children() if isinstance(m, nn.Conv2d)]
            stride, origin = coord_map(layers)
            channels = [m for m in layers if isinstance(m, nn.Conv2d)][-1].out_channels
            for feature, stage in FEATURES.items():
                if stage == name:
                    self.feature_info[feature] = FeatureInfo(channels, stride, origin)
        if self.fc is not None:
            info = self.feature_info["fc7"]
            self.feature_info["fc7"] = FeatureInfo(self.fc.out_channels, info.stride, info.origin)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.layer1(self.stem(x))
        pool3 = self.layer2(x)
        pool4 = self.layer3(pool3)
        top = self.layer4(pool4)
        if self.fc is not None:
            top = self.fc(top)
        return {"pool3": pool3, "pool4": pool4, "fc7": top}

    def load_torchvision(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads a torchvision ResNet state dict, every tensor checked by name and shape; ``fc``
        becomes the 1x1 convolution (or is dropped with ``fc=False``)."""

        def rename(key: str) -> str:
            return key.removeprefix("stem.")  # torchvision's conv1, bn1 at the top level

        load_by_names(
            self, state_dict, rename, dropped=lambda key: self.fc is None and key.startswith("fc.")
        )


def _resnet(arch: str, doc: str) -> Callable[..., ResNet]:
    return torchvision_builder(arch, lambda fc: ResNet(arch, fc=fc), doc)


resnet18 = _resnet(
    "resnet18",
    """ResNet-18 (He et al.; basic blocks): skips from layer2 (stride 8, 128 channels) and
    layer3 (stride 16, 256 channels); ``fc=False`` gives layer4's 512 channels.""",
)
resnet34 = _resnet(
    "resnet34",
    """ResNet-34 (He et al.; basic blocks): skips from layer2 (stride 8, 128 channels) and
    layer3 (stride 16, 256 channels); ``fc=False`` gives layer4's 512 channels.""",
)
resnet50 = _resnet(
    "resnet50", """ResNet-50 (He et al.): skips from layer2 (stride 8) and layer3 (stride 16)."""
)
resnet101 = _resnet(
    "resnet101", """ResNet-101 (He et al.): skips from layer2 (stride 8) and layer3 (stride 16)."""
)
