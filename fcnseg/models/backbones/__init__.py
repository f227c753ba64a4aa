"""Backbones: each returns named feature maps and describes them in ``feature_info``."""

from fcnseg.models.backbones.vgg import VGG, vgg16, vgg16_bn, vgg19, vgg_tiny

__all__ = ["VGG", "vgg16", "vgg16_bn", "vgg19", "vgg_tiny"]
