"""Heads: callables ``(feature_info, num_classes, **options) -> nn.Module``."""

from fcnseg.models.heads.deconvnet import DeconvNetHead, deconvnet
from fcnseg.models.heads.fcn import FCNHead, fcn8s, fcn8s_atonce, fcn16s, fcn32s
from fcnseg.models.heads.segnet import SegNetHead, segnet

__all__ = [
    "DeconvNetHead",
    "FCNHead",
    "SegNetHead",
    "deconvnet",
    "fcn8s",
    "fcn8s_atonce",
    "fcn16s",
    "fcn32s",
    "segnet",
]
