"""Backbones: each returns named feature maps and describes them in ``feature_info``."""

from fcnseg.models.backbones.alexnet import AlexNet, alexnet
from fcnseg.models.backbones.mobilenet import MobileNetV2, mobilenet_v2
from fcnseg.models.backbones.resnet import ResNet, resnet18, resnet34, resnet50, resnet101
from fcnseg.models.backbones.vgg import (
    VGG,
    vgg16,
    vgg16_bn,
    vgg16_bn_encoder,
    vgg16_encoder,
    vgg19,
    vgg_tiny,
    vgg_tiny_encoder,
)

__all__ = [
    "AlexNet",
    "MobileNetV2",
    "ResNet",
    "VGG",
    "alexnet",
    "mobilenet_v2",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "vgg16",
    "vgg16_bn",
    "vgg16_bn_encoder",
    "vgg16_encoder",
    "vgg19",
    "vgg_tiny",
    "vgg_tiny_encoder",
]
