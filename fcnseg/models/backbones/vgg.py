"""VGG backbones: for the FCN heads (aligned as in FCN) or as encoders for unpooling decoders.

Layer names follow the reference Caffe nets (``conv1_1`` ... ``pool5``, ``fc6``, ``fc7``) so that
weights can be mapped by name; every pooling rounds up (Caffe's ceil mode). One class builds
both geometries:

- **FCN** (``indices=False``, the default): conv1_1 is padded by 100 so that any input, however
  small, survives five poolings and a valid 7x7 fc6. The forward dict holds ``pool3``,
  ``pool4`` and ``fc7``, the maps the FCN heads fuse.
- **Encoder** (``indices=True``), for SegNet (Badrinarayanan et al., 2017) and DeconvNet
  (Noh et al., 2015), which upsample by putting each value back where a max-pooling took it
  from. conv1_1 is padded by 1, as in both papers: every 3x3 convolution keeps the size, and
  since each pooling rounds up no row or column is dropped. For every pooling ``pool1`` ...
  ``pool5`` the forward dict holds ``poolN`` (the pooled features), ``poolN_indices`` (the flat
  argmax positions ``nn.MaxUnpool2d`` needs) and ``poolN_input_size`` (the (H, W) that was
  pooled, so that unpooling restores odd sizes exactly), and ``fc7`` when the fully connected
  layers are kept (DeconvNet; SegNet drops them).

``feature_info`` describes every feature map of the forward dict (``poolN_indices`` shares
``poolN``'s geometry).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.errors import UserError
from fcnseg.models.backbones.weights import load_by_names, load_pretrained
from fcnseg.models.layers import FeatureInfo, FullyConnectedConv2d, coord_map

VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGG19_STAGES = ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)
VGG_TINY_STAGES = tuple(tuple(c // 8 for c in stage) for stage in VGG16_STAGES)
FC6_KERNEL = 7  # the ImageNet classifier's window over pool5


def fc6_padding(height: int, width: int) -> tuple[int, int, int, int]:
    """Zero padding (left, right, top, bottom) that brings a pool5 map up to fc6's 7x7 window.

    The encoder's fc6 is a valid 7x7 convolution, so a pool5 map smaller than 7 in a direction
    is padded, centred with the odd pixel at the bottom/right. DeconvNet's ``fc6_deconv``
    output is cropped back with the same top/left offsets.
    """
    dh, dw = max(0, FC6_KERNEL - height), max(0, FC6_KERNEL - width)
    return dw // 2, dw - dw // 2, dh // 2, dh - dh // 2


class VGG(nn.Module):
    """VGG as a dense feature extractor, in the FCN geometry or as an unpooling encoder.

    Args:
        stages: output channels of the convolutions of each of the five stages.
        batch_norm: BatchNorm after every convolution (torchvision's ``vgg*_bn``).
        indices: the encoder geometry: poolings return their argmax indices, conv1_1 is padded
            by 1, and every pooling's output is returned (see the module docstring).
        fc: keep fc6 (7x7) and fc7 (1x1), the ImageNet classifier as convolutions.
        fc_channels: width of fc6/fc7 (4096 in VGG).
        first_padding: padding of conv1_1; by default 100 (the FCN paper's choice), and 1 with
            ``indices``, the only value that lets the decoder restore the input size.
        fc6_padding: padding of fc6; by default 0 (valid, as in the paper), and with
            ``indices`` whatever brings a pool5 smaller than 7x7 up to the window. With
            ``first_padding=1, fc6_padding=3`` no input pixel is wasted on padding (5-17x less
            work on small images); the head's coordinate maps keep the output aligned.
        dropout: dropout after fc6 and fc7; by default 0.5, and 0 with ``indices`` (DeconvNet
            regularises with BatchNorm).
        fc_batch_norm: BatchNorm after fc6 and fc7; by default only for a BatchNorm encoder
            (DeconvNet's choice; torchvision's classifier has none, and the FCN nets neither).
    """

    def __init__(
        self,
        stages: Sequence[Sequence[int]] = VGG16_STAGES,
        *,
        batch_norm: bool = False,
        indices: bool = False,
        fc: bool = True,
        fc_channels: int = 4096,
        first_padding: int | None = None,
        fc6_padding: int | None = None,
        dropout: float | None = None,
        fc_batch_norm: bool | None = None,
    ) -> None:
        super().__init__()
        if first_padding is None:
            first_padding = 1 if indices else 100
        if indices and first_padding != 1:
            raise UserError(
                f"backbone.first_padding={first_padding} would change the size that the "
                f"unpooling heads restore; an encoder pads conv1_1 by 1"
            )
        if dropout is None:
            dropout = 0.0 if indices else 0.5
        if fc_batch_norm is None:
            fc_batch_norm = batch_norm and indices
        self.indices = indices
        # An encoder pads a small pool5 up to fc6's window at run time, unless told a padding.
        self.pads_to_fc6_window = indices and fc6_padding is None
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        info: dict[str, FeatureInfo] = {}
        in_ch = 3
        for s, widths in enumerate(stages, start=1):
            for i, out_ch in enumerate(widths, start=1):
                pad = first_padding if (s, i) == (1, 1) else 1
                layers[f"conv{s}_{i}"] = nn.Conv2d(in_ch, out_ch, 3, padding=pad)
                if batch_norm:
                    layers[f"bn{s}_{i}"] = nn.BatchNorm2d(out_ch)
                layers[f"relu{s}_{i}"] = nn.ReLU(inplace=True)
                in_ch = out_ch
            layers[f"pool{s}"] = nn.MaxPool2d(2, stride=2, ceil_mode=True, return_indices=indices)
            if indices or s in (3, 4):
                info[f"pool{s}"] = FeatureInfo(in_ch, *coord_map(layers.values()))
                if indices:
                    info[f"pool{s}_indices"] = info[f"pool{s}"]
        # A ModuleDict, not a Sequential: an encoder's pooling returns (values, indices).
        self.features = nn.ModuleDict(layers)
        self.fc: nn.Sequential | None = None
        if fc:
            fc_layers: OrderedDict[str, nn.Module] = OrderedDict()
            for n, cin, kernel in (("6", in_ch, FC6_KERNEL), ("7", fc_channels, 1)):
                pad = (fc6_padding or 0) if n == "6" else 0
                # fc6 sees the 7x7 pool5 window that the ImageNet classifier's first Linear
                # layer saw: a matrix product on the CPU (FullyConnectedConv2d).
                kind = FullyConnectedConv2d if n == "6" else nn.Conv2d
                fc_layers[f"fc{n}"] = kind(cin, fc_channels, kernel, padding=pad)
                if fc_batch_norm:
                    fc_layers[f"bnfc{n}"] = nn.BatchNorm2d(fc_channels)
                fc_layers[f"relu{n}"] = nn.ReLU(inplace=True)
                if dropout > 0:
                    fc_layers[f"drop{n}"] = nn.Dropout2d(dropout)
            self.fc = nn.Sequential(fc_layers)
            info["fc7"] = FeatureInfo(
                fc_channels, *coord_map([*layers.values(), *fc_layers.values()])
            )
        self.feature_info = info
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | torch.Size]:
        feats: dict[str, torch.Tensor | torch.Size] = {}
        for name, layer in self.features.items():
            if self.indices and isinstance(layer, nn.MaxPool2d):
                feats[f"{name}_input_size"] = x.shape[-2:]
                x, feats[f"{name}_indices"] = layer(x)
            else:
                x = layer(x)
            if name in self.feature_info:
                feats[name] = x
        if self.fc is not None:
            if self.pads_to_fc6_window:
                x = F.pad(x, fc6_padding(*x.shape[-2:]))
            feats["fc7"] = self.fc(x)
        return feats

    def load_torchvision(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads a torchvision ``vgg*`` state dict: convolutions and BNs in order, and with
        ``fc`` its first two Linear layers reshaped into the 7x7 fc6 and the 1x1 fc7.

        ``classifier.0`` (25088 -> 4096) becomes fc6, ``classifier.3`` fc7; the 1000-way
        ``classifier.6`` is dropped: the segmentation head scores its own classes.
        torchvision's classifier has no BatchNorm: ``bnfc6``/``bnfc7`` keep their identity
        initialisation.
        """
        ours = [n for n, m in self.features.items() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
        theirs = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("features.")})
        if len(ours) != len(theirs):
            raise UserError(
                f"the weights have {len(theirs)} convolution/BatchNorm layers where this VGG has "
                f"{len(ours)}; pick the backbone that matches them (vgg16 or vgg16_bn)"
            )
        layers = {f"features.{name}.": f"features.{idx}." for name, idx in zip(ours, theirs)}
        layers.update({"fc.fc6.": "classifier.0.", "fc.fc7.": "classifier.3."})

        def rename(key: str) -> str | None:
            layer, _, tensor = key.rpartition(".")
            found = layers.get(f"{layer}.")
            return None if found is None else found + tensor  # bnfc6/bnfc7: not in the file

        used = ("classifier.0.", "classifier.3.") if self.fc is not None else ()
        load_by_names(
            self,
            state_dict,
            rename,
            dropped=lambda key: key.startswith("classifier.") and not key.startswith(used),
        )


def _vgg(
    name: str,
    arch: str | None,
    stages: Sequence[Sequence[int]],
    *,
    pretrained: bool,
    weights: str | Path | None,
    frozen_bn: bool = False,
    **options,
) -> VGG:
    return load_pretrained(
        VGG(stages, **options), name=name, arch=arch, pretrained=pretrained, weights=weights,
        frozen_bn=frozen_bn,
    )  # fmt: skip


def vgg16(
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    indices: bool = False,
    fc: bool = True,
    **options,
) -> VGG:
    """VGG-16 (Simonyan & Zisserman), the FCN paper's backbone; ``options`` go to ``VGG``
    (``frozen_bn``, for the BatchNorm variants, to ``load_pretrained``)."""
    return _vgg(
        "vgg16", "vgg16", VGG16_STAGES, pretrained=pretrained, weights=weights,
        indices=indices, fc=fc, **options,
    )  # fmt: skip


def vgg16_bn(
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    indices: bool = False,
    fc: bool = True,
    **options,
) -> VGG:
    """VGG-16 with BatchNorm after every convolution (SegNet's encoder with ``indices=True``)."""
    return _vgg(
        "vgg16_bn", "vgg16_bn", VGG16_STAGES, pretrained=pretrained, weights=weights,
        indices=indices, fc=fc, batch_norm=True, **options,
    )  # fmt: skip


def vgg19(
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    indices: bool = False,
    fc: bool = True,
    **options,
) -> VGG:
    """VGG-19."""
    return _vgg(
        "vgg19", "vgg19", VGG19_STAGES, pretrained=pretrained, weights=weights,
        indices=indices, fc=fc, **options,
    )  # fmt: skip


def vgg_tiny(
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    indices: bool = False,
    fc: bool = True,
    batch_norm: bool = True,
    **options,
) -> VGG:
    """VGG-16's topology at 1/8 of its widths (8 ... 64 channels, fc6/fc7 of 512).

    For CPU tests and the quickstart. There are no ImageNet weights for it; BatchNorm (on by
    default) lets it train from scratch in minutes.
    """
    options.setdefault("fc_channels", 512)
    return _vgg(
        "vgg_tiny", None, VGG_TINY_STAGES, pretrained=pretrained, weights=weights,
        indices=indices, fc=fc, batch_norm=batch_norm, **options,
    )  # fmt: skip


# The encoders for the unpooling heads, by the names their configs and checkpoints use. Given a
# plain VGG's name, build_model builds the same encoder for a SegNet or DeconvNet head.
def vgg16_encoder(
    *, pretrained: bool = False, weights: str | Path | None = None, fc: bool = False, **options
) -> VGG:
    """VGG-16's 13 convolutions without BatchNorm, poolings returning indices:
    ``vgg16(indices=True, fc=False)``."""
    options["indices"] = True
    return vgg16(pretrained=pretrained, weights=weights, fc=fc, **options)


def vgg16_bn_encoder(
    *, pretrained: bool = False, weights: str | Path | None = None, fc: bool = False, **options
) -> VGG:
    """VGG-16 with BatchNorm, poolings returning indices: SegNet's encoder (DeconvNet's with
    ``fc=True``), initialised from torchvision's ``vgg16_bn``: ``vgg16_bn(indices=True)``."""
    options["indices"] = True
    return vgg16_bn(pretrained=pretrained, weights=weights, fc=fc, **options)


def vgg_tiny_encoder(
    *, pretrained: bool = False, weights: str | Path | None = None, fc: bool = False, **options
) -> VGG:
    """The encoder at 1/8 of VGG-16's widths (8 ... 64 channels, fc6/fc7 of 512), with
    BatchNorm: ``vgg_tiny(indices=True, fc=False)``. For CPU tests and quick experiments."""
    options["indices"] = True
    return vgg_tiny(pretrained=pretrained, weights=weights, fc=fc, **options)
