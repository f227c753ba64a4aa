"""A plain PyTorch transcription of the reference VGG16 FCN-8s, layer by layer.

Written the way the widely used PyTorch port of the Caffe nets writes it: every layer an
attribute under the port's name (VGG16's 13 convolutions set from a table of its stages), the
head's forward pass spelt out, crop offsets as literals (5, 9, 31). It shares no code
with ``fcnseg.models`` on purpose: the benchmark times the fcnseg training step against it at
equal settings, and its parameter names are the port's (``conv1_1.weight`` ... ``score_fr``,
``upscore2``, ``score_pool4``, ``upscore_pool4``, ``score_pool3``, ``upscore8``).
"""

from __future__ import annotations

import torch
from torch import nn

from fcnseg.errors import UserError

# VGG16's convolution stages, (width, convolutions), each ending in a 2x2 max pooling.
VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class ReferenceFCN8s(nn.Module):
    """VGG16 FCN-8s exactly as the reference net: (N, 3, H, W) -> logits (N, n_class, H, W)."""

    def __init__(self, n_class: int = 21) -> None:
        super().__init__()
        channels = 3
        for stage, (width, depth) in enumerate(VGG16_STAGES, start=1):
            for i in range(1, depth + 1):
                # The first convolution pads by 100, the paper's way to fit any input size.
                padding = 100 if stage == i == 1 else 1
                setattr(self, f"conv{stage}_{i}", nn.Conv2d(channels, width, 3, padding=padding))
                setattr(self, f"relu{stage}_{i}", nn.ReLU(inplace=True))
                channels = width
            # pool1 ... pool5: strides 2 ... 32
            setattr(self, f"pool{stage}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
        # fc6
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout2d()
        # fc7
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout2d()

        self.score_fr = nn.Conv2d(4096, n_class, 1)
        self.score_pool3 = nn.Conv2d(256, n_class, 1)
        self.score_pool4 = nn.Conv2d(512, n_class, 1)

        self.upscore2 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(n_class, n_class, 16, stride=8, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        pools = []
        for stage, (_, depth) in enumerate(VGG16_STAGES, start=1):
            for i in range(1, depth + 1):
                h = getattr(self, f"relu{stage}_{i}")(getattr(self, f"conv{stage}_{i}")(h))
            h = getattr(self, f"pool{stage}")(h)
            pools.append(h)
        pool3, pool4 = pools[2], pools[3]  # 1/8, 1/16

        h = self.drop6(self.relu6(self.fc6(h)))
        h = self.drop7(self.relu7(self.fc7(h)))

        upscore2 = self.upscore2(self.score_fr(h))  # 1/16
        score_pool4c = _crop(self.score_pool4(pool4), 5, upscore2)  # 1/16
        upscore_pool4 = self.upscore_pool4(upscore2 + score_pool4c)  # 1/8
        score_pool3c = _crop(self.score_pool3(pool3), 9, upscore_pool4)  # 1/8
        h = self.upscore8(upscore_pool4 + score_pool3c)
        return _crop(h, 31, x).contiguous()


def _crop(h: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """``h`` from ``offset`` down and right, cut to the height and width of ``like``."""
    return h[:, :, offset : offset + like.size()[2], offset : offset + like.size()[3]]


def reference_fcn8s_like(model: nn.Module, num_classes: int) -> ReferenceFCN8s:
    """A ``ReferenceFCN8s`` holding the weights of ``model``, an fcnseg VGG16 FCN-8s.

    The two networks then compute the same function, so timing them compares implementations,
    not weights. Raises ``UserError`` when ``model`` is not a VGG16 FCN-8s.
    """
    renamed = {}
    for key, value in model.state_dict().items():
        # backbone.features.conv1_1.weight -> conv1_1.weight; head.score_fr.bias -> score_fr.bias
        for prefix in ("backbone.features.", "backbone.fc.", "head."):
            if key.startswith(prefix):
                renamed[key[len(prefix) :]] = value
                break
    reference = ReferenceFCN8s(num_classes)
    ours = reference.state_dict()
    missing = sorted(set(ours) - set(renamed))
    extra = sorted(set(renamed) - set(ours))
    shapes = [k for k in set(ours) & set(renamed) if ours[k].shape != renamed[k].shape]
    if missing or extra or shapes:
        culprit = (missing or extra or shapes)[0]
        raise UserError(
            "the reference network is VGG16 FCN-8s (backbone=vgg16 head=fcn8s); this model's "
            f"weights do not fit it (first mismatch: {culprit})"
        )
    reference.load_state_dict(renamed, strict=True)
    return reference
