"""VGG backbones with the classifier converted to convolutions, aligned as in FCN.

Layer names follow the reference Caffe nets (``conv1_1`` ... ``pool5``, ``fc6``, ``fc7``) so that
weights can be mapped by name. The FCN alignment: conv1_1 is padded by 100 so that any input,
however small, survives five poolings and a valid 7x7 fc6; poolings round up (Caffe's ceil mode).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fcnseg.models.backbones.weights import load_local_state_dict, torchvision_state_dict
from fcnseg.models.convert import linear_weight_as_conv
from fcnseg.models.layers import FeatureInfo, FullyConnectedConv2d, coord_map

VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGG19_STAGES = ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)


class VGG(nn.Module):
    """VGG as a dense feature extractor returning ``pool3``, ``pool4`` and ``fc7``.

    Args:
        stages: output channels of the convolutions of each of the five stages.
        fc_channels: width of fc6/fc7 (4096 in VGG).
        batch_norm: BatchNorm after every convolution (torchvision's ``vgg*_bn``).
        first_padding: padding of conv1_1; 100 is the FCN paper's choice.
        fc6_padding: padding of the 7x7 fc6; 0 (valid) as in the paper. With
            ``first_padding=1, fc6_padding=3`` no input pixel is wasted on padding (5-17x less
            work on small images); the head's coordinate maps keep the output aligned.
        dropout: dropout after fc6 and fc7.
    """

    out_features = ("pool3", "pool4", "fc7")

    def __init__(
        self,
        stages: Sequence[Sequence[int]] = VGG16_STAGES,
        *,
        fc_channels: int = 4096,
        batch_norm: bool = False,
        first_padding: int = 100,
        fc6_padding: int = 0,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = 3
        for s, widths in enumerate(stages, start=1):
            for i, out_ch in enumerate(widths, start=1):
                pad = first_padding if (s, i) == (1, 1) else 1
                layers[f"conv{s}_{i}"] = nn.Conv2d(in_ch, out_ch, 3, padding=pad)
                if batch_norm:
                    layers[f"bn{s}_{i}"] = nn.BatchNorm2d(out_ch)
                layers[f"relu{s}_{i}"] = nn.ReLU(inplace=True)
                in_ch = out_ch
            layers[f"pool{s}"] = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.features = nn.Sequential(layers)
        # fc6 sees the 7x7 pool5 window that the ImageNet classifier's first Linear layer saw.
        self.fc = nn.Sequential(
            OrderedDict(
                fc6=FullyConnectedConv2d(in_ch, fc_channels, 7, padding=fc6_padding),
                relu6=nn.ReLU(inplace=True),
                drop6=nn.Dropout2d(dropout),
                fc7=nn.Conv2d(fc_channels, fc_channels, 1),
                relu7=nn.ReLU(inplace=True),
                drop7=nn.Dropout2d(dropout),
            )
        )
        self.feature_info = self._feature_info(in_ch, fc_channels)
        self._init_weights()

    def _feature_info(self, pool5_channels: int, fc_channels: int) -> dict[str, FeatureInfo]:
        info = {}
        names = list(self.features._modules)
        for name in ("pool3", "pool4"):
            upto = list(self.features)[: names.index(name) + 1]
            conv = [m for m in upto if isinstance(m, nn.Conv2d)][-1]
            info[name] = FeatureInfo(conv.out_channels, *coord_map(upto))
        info["fc7"] = FeatureInfo(fc_channels, *coord_map([*self.features, *self.fc]))
        return info

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = {}
        for name, layer in self.features.named_children():
            x = layer(x)
            if name in self.feature_info:
                feats[name] = x
        feats["fc7"] = self.fc(x)
        return feats

    def load_torchvision(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads a torchvision ``vgg*`` state dict, reshaping its Linear layers into fc6/fc7.

        torchvision's ``features`` hold the convolutions (and BNs) in the same order as ours;
        ``classifier.0`` (25088 -> 4096) becomes the 7x7 fc6, ``classifier.3`` the 1x1 fc7. The
        1000-way ``classifier.6`` is dropped: the segmentation head scores its own classes.
        """
        ours = [m for m in self.features if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
        theirs = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("features.")})
        if len(ours) != len(theirs):
            raise ValueError(
                f"the weights have {len(theirs)} convolution/BN layers "
                f"where this VGG has {len(ours)}"
            )
        mapped = {}
        for module, idx in zip(ours, theirs):
            name = next(n for n, m in self.features.named_children() if m is module)
            for k, v in state_dict.items():
                if k.startswith(f"features.{idx}."):
                    mapped[f"features.{name}.{k.split('.', 2)[2]}"] = v
        fc6, fc7 = self.fc.fc6, self.fc.fc7
        mapped["fc.fc6.weight"] = linear_weight_as_conv(
            state_dict["classifier.0.weight"], fc6.weight.shape, name="classifier.0.weight"
        )
        mapped["fc.fc6.bias"] = state_dict["classifier.0.bias"]
        mapped["fc.fc7.weight"] = linear_weight_as_conv(
            state_dict["classifier.3.weight"], fc7.weight.shape, name="classifier.3.weight"
        )
        mapped["fc.fc7.bias"] = state_dict["classifier.3.bias"]
        self.load_state_dict(mapped, strict=True)


def _build(
    arch: str,
    stages,
    *,
    batch_norm: bool,
    pretrained: bool,
    weights: str | Path | None,
    **kwargs,
) -> VGG:
    model = VGG(stages, batch_norm=batch_norm, **kwargs)
    if weights is not None:
        model.load_torchvision(load_local_state_dict(weights))
    elif pretrained:
        model.load_torchvision(torchvision_state_dict(arch))
    return model


def vgg16(*, pretrained: bool = False, weights: str | Path | None = None, **kwargs) -> VGG:
    """VGG-16 (Simonyan & Zisserman), the FCN paper's backbone."""
    return _build(
        "vgg16", VGG16_STAGES, batch_norm=False, pretrained=pretrained, weights=weights, **kwargs
    )


def vgg16_bn(*, pretrained: bool = False, weights: str | Path | None = None, **kwargs) -> VGG:
    """VGG-16 with BatchNorm after every convolution."""
    return _build(
        "vgg16_bn", VGG16_STAGES, batch_norm=True, pretrained=pretrained, weights=weights, **kwargs
    )


def vgg19(*, pretrained: bool = False, weights: str | Path | None = None, **kwargs) -> VGG:
    """VGG-19."""
    return _build(
        "vgg19", VGG19_STAGES, batch_norm=False, pretrained=pretrained, weights=weights, **kwargs
    )


def vgg_tiny(
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    batch_norm: bool = True,
    **kwargs,
) -> VGG:
    """VGG-16's topology at 1/8 of its widths (8 ... 64 channels, fc6/fc7 of 512).

    For CPU tests and the quickstart. There are no ImageNet weights for it; BatchNorm (on by
    default) lets it train from scratch in minutes.
    """
    if pretrained:
        raise ValueError("vgg_tiny has no pretrained weights; use backbone.pretrained=false")
    stages = tuple(tuple(c // 8 for c in stage) for stage in VGG16_STAGES)
    kwargs.setdefault("fc_channels", 512)
    return _build(
        "vgg_tiny", stages, batch_norm=batch_norm, pretrained=False, weights=weights, **kwargs
    )
