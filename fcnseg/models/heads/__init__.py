"""Heads: callables ``(feature_info, num_classes, **options) -> nn.Module``."""

from fcnseg.models.heads.fcn import FCNHead, fcn8s, fcn16s, fcn32s

__all__ = ["FCNHead", "fcn8s", "fcn16s", "fcn32s"]
