"""MobileNetV2, ResNet-18 and ResNet-34 under the FCN heads: torchvision's own intermediate
maps at strides 8, 16 and 32, every head at odd sizes, pixel-exact alignment, and MobileNetV2's
classifier as a dense scorer."""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_resume import one_thread  # noqa: F401 - autouse fixture
from torch import nn

from fcnseg.errors import UserError
from fcnseg.models import backbones, build_model, heads
from fcnseg.models.convert import classify, fully_convolutional

FCN_HEADS = sorted(n for n in heads.__all__ if n.startswith("fcn"))
NEW = ("mobilenet_v2", "resnet18", "resnet34")


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with BatchNorm statistics and affine parameters drawn at random,
    so that every layer's output depends on the values loaded (a fresh BatchNorm is almost
    the identity)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def torchvision_maps(arch: str, net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stride-8, -16 and -32 maps and the logits, computed by torchvision's own modules
    (MobileNetV2: the outputs of features[6], features[13], features[18])."""
    if arch == "mobilenet_v2":
        pool3 = net.features[:7](x)
        pool4 = net.features[7:14](pool3)
        top = net.features[14:](pool4)
    else:
        stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        pool3 = net.layer2(net.layer1(stem))
        pool4 = net.layer3(pool3)
        top = net.layer4(pool4)
    return {"pool3": pool3, "pool4": pool4, "top": top, "logits": net(x)}


@pytest.mark.parametrize("arch", NEW)
def test_features_are_torchvision_intermediate_maps(arch):
    """With torchvision's weights loaded, pool3/pool4 are torchvision's stride-8/16 maps, fc7
    with ``fc=False`` its stride-32 map, and with ``fc=True`` a score map whose mean is
    torchvision's logits (global average pooling and a Linear layer commute)."""
    theirs = randomised(getattr(torchvision.models, arch)(weights=None))
    state = theirs.state_dict()
    x = torch.randn(2, 3, 67, 45)  # odd: every stride-2 layer rounds up
    with torch.no_grad():
        want = torchvision_maps(arch, theirs, x)
        dense = getattr(backbones, arch)().eval()
        dense.load_torchvision(state)
        got = dense(x)
        plain = getattr(backbones, arch)(fc=False).eval()
        plain.load_torchvision(state)
        top = plain(x)["fc7"]
    for name in ("pool3", "pool4"):
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    torch.testing.assert_close(top, want["top"], rtol=0, atol=0)
    assert got["fc7"].shape == (2, 1000, 3, 2)  # ceil(67 / 32), ceil(45 / 32)
    torch.testing.assert_close(got["fc7"].mean((2, 3)), want["logits"], rtol=1e-4, atol=1e-5)


def test_feature_info_by_hand():
    """Channels from the papers' layer tables; every layer is padded by half its kernel, so
    every map is centred on the input grid (origin 0)."""
    expected = {
        ("mobilenet_v2", True): [(32, 8), (96, 16), (1000, 32)],
        ("mobilenet_v2", False): [(32, 8), (96, 16), (1280, 32)],
        ("resnet18", True): [(128, 8), (256, 16), (1000, 32)],
        ("resnet34", False): [(128, 8), (256, 16), (512, 32)],
    }
    for (arch, fc), infos in expected.items():
        with torch.device("meta"):
            info = getattr(backbones, arch)(fc=fc).feature_info
        assert list(info) == ["pool3", "pool4", "fc7"]
        assert [(i.channels, i.stride, i.origin) for i in info.values()] == [
            (c, s, 0) for c, s in infos
        ], (arch, fc)


@pytest.mark.parametrize("arch", NEW)
def test_every_fcn_head_gives_the_input_size_on_the_cpu(arch):
    torch.manual_seed(0)
    trunk = getattr(backbones, arch)().eval()
    decoders = {name: getattr(heads, name)(trunk.feature_info, 3).eval() for name in FCN_HEADS}
    with torch.no_grad():
        for h, w in ((1, 1), (33, 47), (70, 9)):
            features = trunk(torch.randn(1, 3, h, w))
            for name, head in decoders.items():
                out = head(features, (h, w))
                assert out.shape == (1, 3, h, w) and torch.isfinite(out).all(), (name, h, w)


def _linearised(model: nn.Module) -> nn.Module:
    """The same geometry made linear and positive: no ReLU/ReLU6, average pooling for max
    pooling, every convolution a uniform average. Each output pixel is then a weighted mean of
    input pixels centred where the alignment puts that pixel."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(
                    module,
                    name,
                    nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode),
                )
            elif isinstance(child, nn.ReLU | nn.ReLU6):
                setattr(module, name, nn.Identity())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
    return model.eval()


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_an_input_impulse_lands_on_its_own_pixel(arch):
    """FCN-8s output pixel (y, x) through each path alone (fc7, pool4, pool3: one class
    each) draws on input pixels centred on (y, x): every crop offset is right to the pixel.

    The image is 32 x 7 + 1 pixels square: every map's cells then lie symmetrically about its
    centre pixel (the stride-32 cells on 0, 32, ..., 224), so the zero padding at the borders
    cuts off as much weight on either side of it and cannot shift the centre of the weights
    (these nets see some 400 pixels around each output; off-centre, the border would).
    """
    size = 32 * 7 + 1
    y = x = size // 2
    model = _linearised(build_model(backbone=arch, head="fcn8s", num_classes=3))
    with torch.no_grad():
        for cls, name in enumerate(("score_fr", "score_pool4", "score_pool3")):
            layer = getattr(model.head, name)
            layer.weight.zero_()
            layer.weight[cls] = 1.0 / layer.in_channels
    image = torch.zeros(3, 3, size, size, requires_grad=True)
    logits = model(image)
    (grad,) = torch.autograd.grad(sum(logits[c, c, y, x] for c in range(3)), image)
    coords = torch.arange(size, dtype=torch.float64)
    for cls in range(3):
        weight = grad[cls].sum(0).double()
        assert weight.min() >= 0 and weight.sum() > 0
        cy = (weight.sum(1) * coords).sum() / weight.sum()
        cx = (weight.sum(0) * coords).sum() / weight.sum()
        assert abs(cy - y) < 0.05 and abs(cx - x) < 0.05, (cls, cy.item() - y, cx.item() - x)


def test_parameter_counts():
    """torchvision's own count (the classifier a 1x1 convolution now), then the head's 1x1
    score layers and bias-free C x C transposed convolutions (kernels 3, 3, 15: odd, as the
    maps are centred on the input grid)."""
    c = 21
    tv = sum(p.numel() for p in torchvision.models.mobilenet_v2().parameters())
    up = c * c * (3 * 3 + 3 * 3 + 15 * 15)
    for fc, top in ((True, 1000), (False, 1280)):
        with torch.device("meta"):
            model = build_model(
                backbone="mobilenet_v2", head="fcn8s", num_classes=c, backbone_options={"fc": fc}
            )
        trunk = tv if fc else tv - (1280 * 1000 + 1000)
        head = (top * c + c) + (96 * c + c) + (32 * c + c) + up
        assert sum(p.numel() for p in model.parameters()) == trunk + head


@pytest.mark.parametrize(
    "backbone,head",
    [("mobilenet_v2", "segnet"), ("mobilenet_v2", "deconvnet"), ("resnet18", "segnet")],
)
def test_unpooling_heads_refuse_these_backbones_in_one_sentence(backbone, head):
    with pytest.raises(UserError) as err:
        build_model(backbone=backbone, head=head, num_classes=3)
    message = str(err.value)
    assert f"which {backbone} cannot build; use a VGG backbone" in message
    assert "\n" not in message


def test_dense_mobilenet_v2_equals_torchvision_logits():
    """At 224x224 the converted net scores a 7x7 map whose mean is torchvision's logits."""
    net = randomised(torchvision.models.mobilenet_v2(weights=None))
    x = torch.randn(2, 3, 224, 224)
    dense = fully_convolutional(net)
    assert not dense.training and (dense.stride, dense.origin, dense.window) == (32, 0, (1, 1))
    with torch.no_grad():
        want = net(x)
        scores = dense(x)
    assert scores.shape == (2, 1000, 7, 7)
    torch.testing.assert_close(scores.mean((2, 3)), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(classify(dense, x), want, rtol=1e-4, atol=1e-5)
    # The convolutions are the classifier's own modules; the 1x1 scorer holds its Linear's weights.
    assert dense.features is net.features
    torch.testing.assert_close(dense.classifier.fc.weight[:, :, 0, 0], net.classifier[1].weight)
