"""VGG encoders whose max-poolings return their argmax indices, for unpooling decoders.

SegNet (Badrinarayanan et al., 2017) and DeconvNet (Noh et al., 2015) upsample by putting each
value back where a max-pooling took it from. The encoder therefore returns, for every pooling
``pool1`` ... ``pool5``, three entries in its forward dict:

- ``poolN``: the pooled features;
- ``poolN_indices``: the flat argmax positions that ``nn.MaxPool2d(return_indices=True)``
  recorded, what ``nn.MaxUnpool2d`` needs;
- ``poolN_input_size``: the (H, W) of the map that was pooled, so that unpooling restores odd
  sizes exactly instead of guessing ``2 * size``.

``feature_info`` describes ``poolN`` and ``poolN_indices`` (same geometry), and ``fc7`` when the
converted fully-connected layers are kept (DeconvNet). Unlike the FCN-aligned ``VGG``,
conv1_1 is padded by 1, as in both papers: every 3x3 convolution keeps the size, and each
2x2 pooling rounds up (Caffe's ceil mode) so that no row or column is dropped and any input,
however small or odd, survives five poolings.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.errors import UserError
from fcnseg.models.backbones.vgg import VGG16_STAGES
from fcnseg.models.backbones.weights import load_local_state_dict, torchvision_state_dict
from fcnseg.models.layers import FeatureInfo, coord_map

FC6_KERNEL = 7


def fc6_padding(height: int, width: int) -> tuple[int, int, int, int]:
    """Zero padding (left, right, top, bottom) that brings a pool5 map up to fc6's 7x7 window.

    fc6 is a valid 7x7 convolution (the ImageNet classifier's window), so a pool5 map smaller
    than 7 in a direction is padded, centred with the odd pixel at the bottom/right. DeconvNet's
    ``fc6_deconv`` output is cropped back with the same top/left offsets.
    """
    dh, dw = max(0, FC6_KERNEL - height), max(0, FC6_KERNEL - width)
    return dw // 2, dw - dw // 2, dh // 2, dh - dh // 2


class VGGEncoder(nn.Module):
    """VGG's convolutions with index-returning poolings, optionally followed by fc6/fc7.

    Args:
        stages: output channels of the convolutions of each stage.
        batch_norm: BatchNorm after every convolution (both papers' choice), fc6/fc7 included.
        fc: keep fc6 (a valid 7x7 convolution) and fc7 (1x1), as DeconvNet does. SegNet drops
            them: most of VGG's parameters, and a 7x7 receptive field the decoder cannot use.
        fc_channels: width of fc6/fc7 (4096 in VGG).
        dropout: dropout after fc6 and fc7 (DeconvNet uses none; BatchNorm regularises).
    """

    def __init__(
        self,
        stages: Sequence[Sequence[int]] = VGG16_STAGES,
        *,
        batch_norm: bool = True,
        fc: bool = False,
        fc_channels: int = 4096,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        info: dict[str, FeatureInfo] = {}
        in_ch = 3
        for s, widths in enumerate(stages, start=1):
            for i, out_ch in enumerate(widths, start=1):
                layers[f"conv{s}_{i}"] = nn.Conv2d(in_ch, out_ch, 3, padding=1)
                if batch_norm:
                    layers[f"bn{s}_{i}"] = nn.BatchNorm2d(out_ch)
                layers[f"relu{s}_{i}"] = nn.ReLU(inplace=True)
                in_ch = out_ch
            layers[f"pool{s}"] = nn.MaxPool2d(2, stride=2, ceil_mode=True, return_indices=True)
            pooled = FeatureInfo(in_ch, *coord_map(layers.values()))
            info[f"pool{s}"] = info[f"pool{s}_indices"] = pooled
        # A ModuleDict, not a Sequential: a pooling returns (values, indices).
        self.features = nn.ModuleDict(layers)
        self.pools = tuple(name for name, m in layers.items() if isinstance(m, nn.MaxPool2d))
        self.fc: nn.Sequential | None = None
        if fc:
            fc_layers: OrderedDict[str, nn.Module] = OrderedDict()
            for name, cin in (("6", in_ch), ("7", fc_channels)):
                kernel = FC6_KERNEL if name == "6" else 1
                fc_layers[f"fc{name}"] = nn.Conv2d(cin, fc_channels, kernel)
                if batch_norm:
                    fc_layers[f"bnfc{name}"] = nn.BatchNorm2d(fc_channels)
                fc_layers[f"relu{name}"] = nn.ReLU(inplace=True)
                if dropout > 0:
                    fc_layers[f"drop{name}"] = nn.Dropout2d(dropout)
            self.fc = nn.Sequential(fc_layers)
            info["fc7"] = FeatureInfo(
                fc_channels, *coord_map([*layers.values(), *fc_layers.values()])
            )
        self.feature_info = info
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | torch.Size]:
        feats: dict[str, torch.Tensor | torch.Size] = {}
        for name, layer in self.features.items():
            if isinstance(layer, nn.MaxPool2d):
                feats[f"{name}_input_size"] = x.shape[-2:]
                x, feats[f"{name}_indices"] = layer(x)
                feats[name] = x
            else:
                x = layer(x)
        if self.fc is not None:
            feats["fc7"] = self.fc(F.pad(x, fc6_padding(*x.shape[-2:])))
        return feats

    def load_torchvision(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads a torchvision ``vgg*`` state dict: convolutions and BNs in order, and with
        ``fc`` its first two Linear layers reshaped into the 7x7 fc6 and the 1x1 fc7.

        torchvision's classifier has no BatchNorm; ``bnfc6``/``bnfc7`` keep their identity
        initialisation. The 1000-way ``classifier.6`` is dropped.
        """
        ours = [n for n, m in self.features.items() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
        theirs = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("features.")})
        if len(ours) != len(theirs):
            raise UserError(
                f"the ImageNet weights have {len(theirs)} convolution/BatchNorm layers where this "
                f"encoder has {len(ours)}; pick the backbone that matches them (vgg16 or vgg16_bn)"
            )
        mapped = {}
        for name, idx in zip(ours, theirs):
            for k, v in state_dict.items():
                if k.startswith(f"features.{idx}."):
                    mapped[f"features.{name}.{k.split('.', 2)[2]}"] = v
        if self.fc is not None:
            fc6, fc7 = self.fc.fc6, self.fc.fc7
            if state_dict["classifier.0.weight"].numel() != fc6.weight.numel():
                raise UserError(
                    f"the ImageNet classifier.0 has weights of shape "
                    f"{tuple(state_dict['classifier.0.weight'].shape)}, which do not fold into "
                    f"fc6 {tuple(fc6.weight.shape)}"
                )
            mapped["fc.fc6.weight"] = state_dict["classifier.0.weight"].view_as(fc6.weight)
            mapped["fc.fc6.bias"] = state_dict["classifier.0.bias"]
            mapped["fc.fc7.weight"] = state_dict["classifier.3.weight"].view_as(fc7.weight)
            mapped["fc.fc7.bias"] = state_dict["classifier.3.bias"]
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        fresh = [k for k in missing if not k.startswith(("fc.bnfc6.", "fc.bnfc7."))]
        if fresh or unexpected:
            raise UserError(
                f"the ImageNet weights do not fit this encoder: missing {fresh}, "
                f"unexpected {unexpected}"
            )


def _build(
    arch: str,
    stages: Sequence[Sequence[int]],
    *,
    pretrained: bool,
    weights: str | Path | None,
    **kwargs,
) -> VGGEncoder:
    model = VGGEncoder(stages, **kwargs)
    if weights is not None:
        model.load_torchvision(load_local_state_dict(weights))
    elif pretrained:
        model.load_torchvision(torchvision_state_dict(arch))
    return model


def vgg16_encoder(
    *, pretrained: bool = False, weights: str | Path | None = None, fc: bool = False, **kwargs
) -> VGGEncoder:
    """VGG-16's 13 convolutions without BatchNorm, poolings returning indices."""
    kwargs.setdefault("batch_norm", False)
    return _build("vgg16", VGG16_STAGES, pretrained=pretrained, weights=weights, fc=fc, **kwargs)


def vgg16_bn_encoder(
    *, pretrained: bool = False, weights: str | Path | None = None, fc: bool = False, **kwargs
) -> VGGEncoder:
    """VGG-16 with BatchNorm, poolings returning indices: SegNet's encoder (DeconvNet's with
    ``fc=True``), initialised from torchvision's ``vgg16_bn``."""
    kwargs["batch_norm"] = True
    return _build("vgg16_bn", VGG16_STAGES, pretrained=pretrained, weights=weights, fc=fc, **kwargs)


def vgg_tiny_encoder(
    *, pretrained: bool = False, weights: str | Path | None = None, fc: bool = False, **kwargs
) -> VGGEncoder:
    """The encoder at 1/8 of VGG-16's widths (8 ... 64 channels, fc6/fc7 of 512), with BatchNorm.

    For CPU tests and quick experiments; there are no ImageNet weights for it.
    """
    if pretrained:
        raise UserError("vgg_tiny_encoder has no pretrained weights; use backbone.pretrained=false")
    stages = tuple(tuple(c // 8 for c in stage) for stage in VGG16_STAGES)
    kwargs.setdefault("fc_channels", 512)
    kwargs.setdefault("batch_norm", True)
    return _build("vgg_tiny", stages, pretrained=False, weights=weights, fc=fc, **kwargs)
