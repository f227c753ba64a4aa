"""AlexNet with the classifier converted to convolutions, aligned as in FCN-AlexNet.

The layers are torchvision's AlexNet (so its ImageNet weights load), arranged as the reference
Caffe FCN-AlexNet arranges its own: conv1 padded by 100 (any input survives the three poolings
and the valid 6x6 fc6), poolings rounding up (Caffe's ceil mode), fc6 a 6x6 convolution over
pool5 and fc7 a 1x1 convolution. Layer names are Caffe's (``conv1`` ... ``pool5``, ``fc6``,
``fc7``).

The heads ask for ``pool3`` (stride 8), ``pool4`` (stride 16) and ``fc7`` (stride 32), VGG's
names; AlexNet's maps at strides 8 and 16 are its ``pool1`` and ``pool2``, returned under those
names so that every FCN head works on it (the paper's FCN-AlexNet is a 32s net).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fcnseg.models.backbones.weights import load_by_names, load_pretrained
from fcnseg.models.layers import FeatureInfo, FullyConnectedConv2d, coord_map

ALEXNET_WIDTHS = (64, 192, 384, 256, 256)  # torchvision's single-tower AlexNet
# The feature each head asks for -> the AlexNet layer that computes it.
FEATURES = {"pool3": "pool1", "pool4": "pool2"}
# torchvision's ``features`` indices of conv1 ... conv5.
TORCHVISION_CONVS = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}


class AlexNet(nn.Module):
    """AlexNet as a dense feature extractor returning ``pool3``, ``pool4`` and ``fc7``.

    Args:
        widths: output channels of conv1 ... conv5.
        fc_channels: width of fc6/fc7 (4096 in AlexNet).
        first_padding: padding of conv1; 100 is FCN-AlexNet's choice.
        dropout: dropout after fc6 and fc7.
    """

    out_features = ("pool3", "pool4", "fc7")

    def __init__(
        self,
        widths: Sequence[int] = ALEXNET_WIDTHS,
        *,
        fc_channels: int = 4096,
        first_padding: int = 100,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = widths

        def pool() -> nn.MaxPool2d:
            return nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, c1, 11, stride=4, padding=first_padding),
                relu1=nn.ReLU(inplace=True),
                pool1=pool(),
                conv2=nn.Conv2d(c1, c2, 5, padding=2),
                relu2=nn.ReLU(inplace=True),
                pool2=pool(),
                conv3=nn.Conv2d(c2, c3, 3, padding=1),
                relu3=nn.ReLU(inplace=True),
                conv4=nn.Conv2d(c3, c4, 3, padding=1),
                relu4=nn.ReLU(inplace=True),
                conv5=nn.Conv2d(c4, c5, 3, padding=1),
                relu5=nn.ReLU(inplace=True),
                pool5=pool(),
            )
        )
        # fc6 sees the 6x6 pool5 window that the ImageNet classifier's first Linear layer saw.
        self.fc = nn.Sequential(
            OrderedDict(
                fc6=FullyConnectedConv2d(c5, fc_channels, 6),
                relu6=nn.ReLU(inplace=True),
                drop6=nn.Dropout2d(dropout),
                fc7=nn.Conv2d(fc_channels, fc_channels, 1),
                relu7=nn.ReLU(inplace=True),
                drop7=nn.Dropout2d(dropout),
            )
        )
        layers = list(self.features.named_children())
        self.feature_info: dict[str, FeatureInfo] = {}
        for name, layer in FEATURES.items():
            upto = [m for _, m in layers[: [n for n, _ in layers].index(layer) + 1]]
            channels = [m for m in upto if isinstance(m, nn.Conv2d)][-1].out_channels
            self.feature_info[name] = FeatureInfo(channels, *coord_map(upto))
        self.feature_info["fc7"] = FeatureInfo(fc_channels, *coord_map([*self.features, *self.fc]))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        wanted = {layer: name for name, layer in FEATURES.items()}
        feats = {}
        for name, layer in self.features.named_children():
            x = layer(x)
            if name in wanted:
                feats[wanted[name]] = x
        feats["fc7"] = self.fc(x)
        return feats

    def load_torchvision(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads a torchvision ``alexnet`` state dict, reshaping its Linear layers.

        ``classifier.1`` (9216 -> 4096) becomes the 6x6 fc6, ``classifier.4`` the 1x1 fc7; the
        1000-way ``classifier.6`` is dropped: the segmentation head scores its own classes.
        """
        layers = {f"features.{name}": f"features.{i}" for name, i in TORCHVISION_CONVS.items()}
        layers.update({"fc.fc6": "classifier.1", "fc.fc7": "classifier.4"})

        def rename(key: str) -> str:
            layer, _, tensor = key.rpartition(".")
            return f"{layers[layer]}.{tensor}"

        load_by_names(self, state_dict, rename, dropped=lambda key: key.startswith("classifier.6."))


def alexnet(
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    fc_channels: int = 4096,
    first_padding: int = 100,
    dropout: float = 0.5,
) -> AlexNet:
    """AlexNet (Krizhevsky et al.; torchvision's single-tower variant), as in FCN-AlexNet."""
    model = AlexNet(fc_channels=fc_channels, first_padding=first_padding, dropout=dropout)
    return load_pretrained(
        model, name="alexnet", arch="alexnet", pretrained=pretrained, weights=weights
    )
