"""Classifier-to-FCN conversion: fully connected layers as the convolutions they are.

A fully connected layer reading a C x h x w map is a convolution with an h x w kernel over C
channels, evaluated at the one position where the kernel covers the map; the fully connected
layers after it are 1x1 convolutions. With the weights reshaped, the converted net computes the
classifier's scores at its native input size, and on a larger input it computes in one pass the
scores of every window of that size at the net's stride, sharing the overlapping convolutions
(Long, Shelhamer & Darrell, section 3.1).

``fully_convolutional`` converts torchvision's VGG (``vgg11`` ... ``vgg19_bn``) and AlexNet,
whose ``classifier`` follows an adaptive average pooling that is dropped (on a larger input it
would squash the map to the native size), and torchvision's ResNets, whose global average
pooling and ``fc`` become a 1x1 convolution: its score map averages to the classifier's output,
and torchvision's MobileNetV2, whose global average pooling (in its ``forward``) and
``classifier`` (dropout, Linear) become the same kind of 1x1 scorer on ``features``' map.

``DenseClassifier`` (and ``classify``) make the converted net classify images of any size, as
VGG's dense evaluation does (Simonyan & Zisserman, 2015, section 3.2): the score map is pooled
(averaged, or its maximum taken) to one score vector per image, optionally averaged over
several scales and the mirrored image.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fcnseg.errors import UserError
from fcnseg.models.layers import FullyConnectedConv2d, coord_map
from fcnseg.utils.validate import size_pair


def linear_weight_as_conv(
    weight: torch.Tensor, conv_shape: Sequence[int], *, name: str = "weight"
) -> torch.Tensor:
    """A Linear layer's (out, C*h*w) weight as the (out, C, h, w) weight of a convolution.

    ``torch.flatten`` of a (C, h, w) map orders it channel, row, column: exactly the order of a
    convolution kernel's (C, h, w) dimensions, so the reshape needs no permutation.

    Args:
        weight: the Linear layer's weight, (out_features, in_features).
        conv_shape: the convolution's weight shape (out, C, h, w), with C*h*w == in_features.
        name: what ``weight`` is, for the error message.
    """
    conv_shape = tuple(int(s) for s in conv_shape)
    if weight.dim() != 2 or (weight.shape[0], weight[0].numel()) != (
        conv_shape[0],
        conv_shape[1] * conv_shape[2] * conv_shape[3],
    ):
        raise UserError(
            f"{name} of shape {tuple(weight.shape)} is not a fully connected layer that a "
            f"convolution of weight shape {conv_shape} can stand for"
        )
    return weight.reshape(conv_shape)


def linear_to_conv(
    linear: nn.Linear, *, in_channels: int | None = None, kernel_size: int | Sequence[int] = 1
) -> nn.Conv2d:
    """A convolution computing ``linear`` on every ``kernel_size`` window of a map.

    Args:
        linear: the fully connected layer.
        in_channels: channels of the map it reads (default: all its inputs, for a 1x1 kernel).
        kernel_size: the (h, w) of the map the layer was trained on (1 for a later layer).
    """
    kh, kw = size_pair(kernel_size, name="kernel_size")
    channels = linear.in_features // (kh * kw) if in_channels is None else in_channels
    # A kernel larger than 1x1 is fc6-like: computed as a matrix product on the CPU.
    kind = FullyConnectedConv2d if kh * kw > 1 else nn.Conv2d
    conv = kind(channels, linear.out_features, (kh, kw), bias=linear.bias is not None)
    conv = conv.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear_weight_as_conv(linear.weight, conv.weight.shape))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


class FullyConvolutionalNet(nn.Module):
    """A classifier turned into a dense scorer: (N, 3, H, W) -> scores (N, K, h, w).

    Cell (i, j) of the score map holds the classifier's scores for the input window centred
    on pixel (stride * i + origin, stride * j + origin) (``stride`` and ``origin`` are the
    coordinate map of the whole net). The convolutional ``features`` are the classifier's own
    modules, shared with it; ``classifier`` holds the converted fully connected layers.
    """

    def __init__(
        self, features: nn.Module, classifier: nn.Sequential, *, pool: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.pool = pool
        layers = [*_flat(features), *_flat(classifier)]
        self.stride, self.origin = coord_map(layers)
        first = next(m for m in classifier if isinstance(m, nn.Conv2d))
        self.window = tuple(first.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.pool is not None:
            x = self.pool(x)
        if x.shape[-2] < self.window[0] or x.shape[-1] < self.window[1]:
            raise ValueError(
                f"an input of {tuple(x.shape[-2:])} feature cells is smaller than the "
                f"{self.window} window the first fully connected layer was trained on; give a "
                f"larger image"
            )
        return self.classifier(x)


def fully_convolutional(model: nn.Module) -> FullyConvolutionalNet:
    """Converts a torchvision ImageNet classifier into a fully convolutional net.

    Supported: VGG (``vgg11`` ... ``vgg19_bn``) and AlexNet (``features``, ``avgpool``,
    ``classifier``): the adaptive average pooling is dropped, the first Linear layer becomes a
    convolution whose kernel spans its input map (VGG: 7x7x512, AlexNet: 6x6x256), the later
    ones 1x1 convolutions; ReLU and Dropout layers are kept. At the native 224x224 the score map
    is 1x1 and equals the classifier's output; on a 384x384 input VGG's is 6x6, one cell per
    224x224 window at a stride of 32. ResNets (``resnet18`` ... ``wide_resnet101_2``): ``fc``
    becomes a 1x1 convolution after ``layer4``; the mean of the score map is the classifier's
    output at any input size (the global average pooling and ``fc`` are both linear).
    MobileNetV2 (``mobilenet_v2``): its classifier's Linear layer becomes a 1x1 convolution on
    ``features``' 1280-channel map (7x7 at 224x224), after a ``Dropout2d`` of the classifier's
    rate; the mean of the score map is the classifier's output at any input size, as for
    ResNet.

    ``model`` is left unchanged; its convolutional layers are shared with the result, and the
    result starts in ``model``'s training mode.

    Raises:
        UserError: ``model`` is not one of the supported kinds.
    """
    if _is_mobilenet_v2(model):
        net = _convert_mobilenet_v2(model)
    elif isinstance(getattr(model, "classifier", None), nn.Sequential) and isinstance(
        getattr(model, "features", None), nn.Module
    ):
        net = _convert_features_classifier(model)
    elif isinstance(getattr(model, "fc", None), nn.Linear) and hasattr(model, "layer4"):
        net = _convert_resnet(model)
    else:
        raise UserError(
            f"cannot convert a {type(model).__name__}: fully_convolutional takes torchvision's "
            f"VGG (vgg11 ... vgg19_bn), AlexNet, ResNet or MobileNetV2 classifiers"
        )
    return net.train(model.training)


POOLS = ("mean", "max")


class DenseClassifier(nn.Module):
    """Class scores (N, K) for images (N, 3, H, W) of any size at least the native one.

    The converted net's score map (one cell per native-size window, at the net's stride) is
    pooled over its cells: ``mean`` is VGG's dense evaluation (its "sum-pooling", up to the
    number of cells), ``max`` takes each class's best window. Each scale (the image resized
    by the factor, bilinear) and, with ``flip``, its mirror image is one view; the pooled scores
    of the views are averaged. At the native size, one view, the scores are the classifier's
    own output. (VGG averaged softmax posteriors over its views; apply a softmax per view for
    that, here the scores stay the classifier's logits.)

    Args:
        net: ``fully_convolutional(classifier)``, or a classifier to convert.
        pool: ``mean`` or ``max``.
        scales: resize factors of the views (VGG: the image's smallest side at 256, 384, 512).
        flip: also the horizontally mirrored image of every scale.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        pool: str = "mean",
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise UserError(f"pool={pool!r} is not one of {', '.join(POOLS)}")
        if not scales or min(scales) <= 0:
            raise UserError(f"scales={list(scales)!r} must be a non-empty list of positive factors")
        self.net = net if isinstance(net, FullyConvolutionalNet) else fully_convolutional(net)
        self.pool = pool
        self.scales = tuple(float(s) for s in scales)
        self.flip = bool(flip)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = None
        views = 0
        for scale in self.scales:
            x = images
            if scale != 1.0:
                # A factor, not a size: the size follows the input's, also in an exported graph.
                x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            for mirrored in (False, True) if self.flip else (False,):
                scores = self.net(x.flip(-1) if mirrored else x)
                pooled = scores.mean((-2, -1)) if self.pool == "mean" else scores.amax((-2, -1))
                total = pooled if total is None else total + pooled
                views += 1
        return total if views == 1 else total / views


def classify(
    net: nn.Module,
    images: torch.Tensor,
    *,
    pool: str = "mean",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class scores (N, K) of ``images`` of any size: ``DenseClassifier(net, ...)(images)``
    without gradients.

    Args:
        net: ``fully_convolutional(classifier)``, or a torchvision classifier to convert.
        images: (N, 3, H, W), normalised as the classifier was trained, each side at least the
            native size (224 for VGG) times the smallest scale.
        pool, scales, flip: see ``DenseClassifier``.
    """
    with torch.no_grad():
        return DenseClassifier(net, pool=pool, scales=scales, flip=flip)(images)


def _convert_features_classifier(model: nn.Module) -> FullyConvolutionalNet:
    name = type(model).__name__
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError(f"cannot convert a {name}: its features hold no convolution")
    channels = convs[-1].out_channels
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"cannot convert a {name}: its classifier holds no Linear layer")
    # The map the first Linear layer read: what the adaptive pooling made of the features.
    size = getattr(getattr(model, "avgpool", None), "output_size", None)
    if size is None:
        side = round((linears[0].in_features / channels) ** 0.5)
        size = (side, side)
    window = size_pair(size, name=f"{name}.avgpool.output_size")
    if channels * window[0] * window[1] != linears[0].in_features:
        raise UserError(
            f"cannot convert a {name}: its first Linear layer reads {linears[0].in_features} "
            f"values, not a {channels}x{window[0]}x{window[1]} map"
        )
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    previous = None
    for index, module in enumerate(model.classifier):
        if isinstance(module, nn.Linear):
            if previous is not None and module.in_features != previous.out_features:
                raise UserError(
                    f"cannot convert a {name}: classifier.{index} reads {module.in_features} "
                    f"values after a layer giving {previous.out_features}"
                )
            kernel = window if previous is None else 1
            layers[str(index)] = linear_to_conv(module, in_channels=channels, kernel_size=kernel)
            channels, previous = module.out_features, module
        elif isinstance(module, nn.ReLU | nn.Dropout | nn.Identity):
            # Element-wise: the same on the (N, C, h, w) score map as on the (N, C) vector.
            layers[str(index)] = module
        else:
            raise UserError(
                f"cannot convert a {name}: classifier.{index} is a {type(module).__name__}, "
                f"not a Linear, ReLU or Dropout layer"
            )
    return FullyConvolutionalNet(model.features, nn.Sequential(layers))


def _convert_resnet(model: nn.Module) -> FullyConvolutionalNet:
    features = nn.Sequential(
        OrderedDict(
            (n, getattr(model, n))
            for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        )
    )
    return FullyConvolutionalNet(features, nn.Sequential(OrderedDict(fc=linear_to_conv(model.fc))))


def _is_mobilenet_v2(model: nn.Module) -> bool:
    if type(model).__name__ != "MobileNetV2":  # cheap: torchvision is imported only then
        return False
    from torchvision.models import MobileNetV2

    return isinstance(model, MobileNetV2)


def _convert_mobilenet_v2(model: nn.Module) -> FullyConvolutionalNet:
    kinds = [type(m) for m in model.classifier]
    if kinds != [nn.Dropout, nn.Linear]:
        names = ", ".join(k.__name__ for k in kinds)
        raise UserError(
            f"cannot convert a MobileNetV2 whose classifier is {names}, not Dropout, Linear"
        )
    drop, linear = model.classifier
    # torchvision drops whole channels of the pooled vector: on the map, one draw per channel
    # and image, Dropout2d. The pooling itself moves past the (linear) 1x1 convolution.
    return FullyConvolutionalNet(
        model.features,
        nn.Sequential(OrderedDict(dropout=nn.Dropout2d(drop.p), fc=linear_to_conv(linear))),
    )


def _flat(module: nn.Module) -> list[nn.Module]:
    """The layers of ``module`` in order, for the coordinate map.

    A residual block's main branch stands for the block (its shortcut has the same geometry).
    """
    children = list(module.children())
    if not children:
        return [module]
    if hasattr(module, "conv1") and hasattr(module, "conv2"):  # torchvision residual block
        return [m for m in children if isinstance(m, nn.Conv2d)]
    return [leaf for child in children for leaf in _flat(child)]
