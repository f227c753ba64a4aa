"""SegNet's decoder (Badrinarayanan, Kendall & Cipolla, 2017): max-unpooling, then convolutions.

Each decoder stage mirrors an encoder stage: ``MaxUnpool2d`` puts every value of the coarser
map back at the position its encoder pooling took the maximum from (the recorded indices;
every other position is zero), and 3x3 conv-BN-ReLU blocks densify the sparse map. Nothing
about the upsampling is learned, and only the indices, not the encoder's features, travel to
the decoder. The layer names are those of the reference ``segnet_train.prototxt``
(``conv5_3_D`` ... ``conv1_1_D``; ``conv1_1_D`` is the classifier).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from fcnseg.errors import UserError
from fcnseg.models.layers import FeatureInfo

VGG16_DEPTHS = (2, 2, 3, 3, 3)


class UnpoolStage(nn.Sequential):
    """``MaxUnpool2d`` fed with the indices of encoder pooling ``pool``, then ``layers``.

    The first child is the unpooling (named ``unpoolN`` after ``poolN``), so the pairing shows
    in the printed module tree. The output size is the size of the map the encoder pooled,
    which makes odd sizes round-trip exactly.
    """

    def __init__(self, pool: str, layers: Mapping[str, nn.Module]) -> None:
        super().__init__(OrderedDict([(f"un{pool}", nn.MaxUnpool2d(2, stride=2)), *layers.items()]))
        self.pool = pool

    def extra_repr(self) -> str:
        return f"indices from {self.pool}"

    def forward(self, x: torch.Tensor, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        unpool, *layers = self.children()
        x = unpool(
            x, features[f"{self.pool}_indices"], output_size=features[f"{self.pool}_input_size"]
        )
        for layer in layers:
            x = layer(x)
        return x


def check_unpooling_backbone(
    feature_info: Mapping[str, FeatureInfo], head: str, num_stages: int
) -> list[str]:
    """``pool1`` ... ``poolN``, or a ``UserError`` when the backbone lacks their indices."""
    pools = [f"pool{s}" for s in range(1, num_stages + 1)]
    missing = [p for p in pools if p not in feature_info or f"{p}_indices" not in feature_info]
    if missing:
        raise UserError(
            f"head {head} unpools with the max-pooling indices of {', '.join(pools)}, but the "
            f"backbone gives only {', '.join(feature_info) or 'nothing'}; use an encoder backbone "
            f"(a VGG built with indices=true, as build_model does for a VGG given by name)"
        )
    return pools


def conv_block(
    conv: nn.Module, names: tuple[str, str, str], *, batch_norm: bool
) -> list[tuple[str, nn.Module]]:
    """``[(conv name, conv), (BN name, BN), (ReLU name, ReLU)]``, without the BN if not asked."""
    conv_name, bn_name, relu_name = names
    layers: list[tuple[str, nn.Module]] = [(conv_name, conv)]
    if batch_norm:
        layers.append((bn_name, nn.BatchNorm2d(conv.out_channels)))
    layers.append((relu_name, nn.ReLU(inplace=True)))
    return layers


class UnpoolingHead(nn.Module):
    """What SegNet's and DeconvNet's decoders share: unpooling stages mirroring the encoder's
    ``pool1`` ... ``poolN``, built and run coarse to fine.

    The constructor checks the depths and the backbone's indices (``head`` names the head in
    messages); a subclass checks its own settings, adds its stages with ``add_stages`` and
    runs them with ``decode``.
    """

    def __init__(
        self, feature_info: Mapping[str, FeatureInfo], depths: Sequence[int], head: str
    ) -> None:
        super().__init__()
        if not depths or min(depths) < 1:
            raise UserError(f"head.depths={list(depths)} needs at least one convolution per stage")
        self.pools = check_unpooling_backbone(feature_info, head, len(depths))

    def add_stages(
        self,
        feature_info: Mapping[str, FeatureInfo],
        stage: Callable[[int, int, int | None], list[tuple[str, nn.Module]]],
    ) -> None:
        """Adds ``stageN`` ... ``stage1``, each an ``UnpoolStage`` of the layers that
        ``stage(N, width, narrow)`` builds: ``width`` is ``poolN``'s channels, ``narrow``
        ``pool(N-1)``'s, the width the stage's last layer narrows to (``None`` for stage 1)."""
        for s in range(len(self.pools), 0, -1):
            width = feature_info[f"pool{s}"].channels
            narrow = feature_info[f"pool{s - 1}"].channels if s > 1 else None
            self.add_module(
                f"stage{s}", UnpoolStage(f"pool{s}", OrderedDict(stage(s, width, narrow)))
            )

    def decode(
        self, x: torch.Tensor, features: Mapping[str, torch.Tensor], size: tuple[int, int]
    ) -> torch.Tensor:
        """``x`` (at ``poolN``'s size) through the stages, coarse to fine, checked to come out
        at the input's ``size``."""
        for s in range(len(self.pools), 0, -1):
            x = getattr(self, f"stage{s}")(x, features)
        if tuple(x.shape[-2:]) != tuple(size):
            raise RuntimeError(
                f"the decoder produced {tuple(x.shape[-2:])} for an input of {tuple(size)}"
            )
        return x


class SegNetHead(UnpoolingHead):
    """Decoder of unpooling stages mirroring the encoder, coarse to fine, then a classifier.

    Decoder stage N has as many convolutions as encoder stage N; all keep the width of
    ``poolN`` except the last, which narrows to the width of ``pool(N-1)`` (stage 1: the last
    convolution is the classifier, without BN or ReLU).

    Args:
        feature_info: the backbone's; must describe ``pool1`` ... ``poolN`` and their indices.
        num_classes: number of output classes.
        classifier_kernel: kernel of the classifier (3 in the reference net, 1 is also common).
        depths: convolutions per decoder stage, finest first (VGG-16's by default).
        batch_norm: BatchNorm after every decoder convolution but the classifier.
    """

    # What build_model builds the backbone with: an encoder whose poolings return their
    # indices, without fc6/fc7 (most of VGG's parameters, a 7x7 window the decoder cannot use).
    backbone_options: ClassVar[Mapping[str, Any]] = MappingProxyType({"indices": True, "fc": False})

    def __init__(
        self,
        feature_info: Mapping[str, FeatureInfo],
        num_classes: int,
        *,
        classifier_kernel: int = 3,
        depths: Sequence[int] = VGG16_DEPTHS,
        batch_norm: bool = True,
    ) -> None:
        super().__init__(feature_info, depths, "segnet")
        if "fc7" in feature_info:
            raise UserError(
                "head segnet does not use the backbone's fc6/fc7, which would sit idle (and break "
                "distributed training); set backbone.fc=false"
            )
        if classifier_kernel % 2 != 1:
            raise UserError(
                f"head.classifier_kernel={classifier_kernel} must be odd to keep the size"
            )

        def stage(s: int, width: int, narrow: int | None) -> list[tuple[str, nn.Module]]:
            out = num_classes if narrow is None else narrow
            layers: list[tuple[str, nn.Module]] = []
            for i in range(depths[s - 1], 0, -1):  # conv5_3_D, conv5_2_D, conv5_1_D
                if s == 1 and i == 1:
                    pad = classifier_kernel // 2
                    layers.append(
                        (f"conv{s}_{i}_D", nn.Conv2d(width, out, classifier_kernel, padding=pad))
                    )
                else:
                    cout = out if i == 1 else width
                    name = f"{s}_{i}_D"
                    conv = nn.Conv2d(width, cout, 3, padding=1)
                    layers += conv_block(
                        conv,
                        (f"conv{name}", f"conv{name}_bn", f"relu{name}"),
                        batch_norm=batch_norm,
                    )
            return layers

        self.add_stages(feature_info, stage)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the reference net's "msra" filler
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, features: Mapping[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return self.decode(features[self.pools[-1]], features, size)


def head_builder(head: type[UnpoolingHead], name: str, doc: str) -> Callable[..., UnpoolingHead]:
    """The public builder ``name`` of ``head``: its constructor under the name that configs
    and model descriptions use, with its signature and the ``backbone_options`` it asks for.
    """

    def build(
        feature_info: Mapping[str, FeatureInfo], num_classes: int, **options: Any
    ) -> UnpoolingHead:
        return head(feature_info, num_classes, **options)

    build.__signature__ = inspect.signature(head).replace(return_annotation=head.__name__)
    build.__name__ = build.__qualname__ = name
    build.__module__ = head.__module__
    build.__doc__ = doc
    build.backbone_options = head.backbone_options
    return build


segnet = head_builder(
    SegNetHead, "segnet", "SegNet: five unpooling stages mirroring VGG-16's, a 3x3 classifier."
)
