"""The FCN family: exact output sizes, bilinear upsampling, the reference alignment, parameter
counts, the at-once scaling, ImageNet weight mapping and staged initialisation."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fcnseg.errors import UserError
from fcnseg.models import backbones, build_model, heads
from fcnseg.models.init import copy_shared, init_from_checkpoint

FCN_HEADS = sorted(n for n in heads.__all__ if n.startswith("fcn"))
BACKBONES = sorted(n for n in backbones.__all__ if n[0].islower())
# Backbones made for the unpooling heads lack the fc7 / pool4 / pool3 maps the FCN heads fuse.
FCN_BACKBONES = [n for n in BACKBONES if not n.endswith("_encoder")]
ODD_SIZES = [(1, 1), (1, 17), (31, 45), (97, 64), (224, 224), (333, 501)]


def _meta_model(backbone: str, head: str, num_classes: int = 21, **options) -> nn.Module:
    # Shapes only: the meta device computes every layer's output shape without the arithmetic.
    with torch.device("meta"):
        return build_model(
            backbone=backbone, head=head, num_classes=num_classes, backbone_options=options
        ).eval()


def test_the_fcn_family_is_complete():
    assert FCN_HEADS == ["fcn16s", "fcn32s", "fcn8s", "fcn8s_atonce"]
    assert {"vgg16", "vgg19", "alexnet", "vgg_tiny", "resnet50", "resnet101"} <= set(BACKBONES)


@pytest.mark.parametrize("backbone", FCN_BACKBONES)
def test_output_is_exactly_the_input_size(backbone):
    """Every FCN head on this backbone, through build_model, at sizes odd and tiny."""
    with torch.device("meta"):
        trunk = getattr(backbones, backbone)().eval()
        models = {
            head: build_model(backbone=trunk, head=head, num_classes=7).eval() for head in FCN_HEADS
        }
    for h, w in ODD_SIZES:
        x = torch.empty(2, 3, h, w, device="meta")
        for head, model in models.items():
            assert model(x).shape == (2, 7, h, w), (head, h, w)


@pytest.mark.parametrize(
    "backbone,options,sizes",
    [
        ("vgg_tiny", {}, [(1, 1), (33, 47)]),
        ("alexnet", {}, [(45, 70)]),
        ("resnet50", {}, [(1, 1), (37, 66)]),
    ],
)
def test_output_size_on_the_cpu(backbone, options, sizes):
    torch.manual_seed(0)
    trunk = getattr(backbones, backbone)(**options).eval()
    decoders = {name: getattr(heads, name)(trunk.feature_info, 3).eval() for name in FCN_HEADS}
    with torch.no_grad():
        for h, w in sizes:
            features = trunk(torch.randn(1, 3, h, w))
            for name, head in decoders.items():
                out = head(features, (h, w))
                assert out.shape == (1, 3, h, w) and torch.isfinite(out).all(), (name, h, w)


@pytest.mark.parametrize("backbone", [n for n in BACKBONES if n.endswith("_encoder")])
def test_fcn_head_on_a_backbone_without_its_features_says_so(backbone):
    with pytest.raises(UserError, match="the FCN head fuses fc7, pool4, pool3"):
        _meta_model(backbone, "fcn8s")


# ---------------------------------------------------------------- bilinear upsampling
def _bilinear_1d(kernel: int) -> torch.Tensor:
    """Written out from the definition: weight 1 at the centre, falling linearly to 0 at a
    distance of ceil(kernel / 2) taps."""
    factor = (kernel + 1) // 2
    centre = factor - 1 if kernel % 2 else factor - 0.5
    return torch.tensor([1 - abs(i - centre) / factor for i in range(kernel)])


def test_upsampling_is_initialised_to_bilinear_interpolation():
    head = build_model(backbone="vgg_tiny", head="fcn8s", num_classes=3).head
    assert _bilinear_1d(4).tolist() == [0.25, 0.75, 0.75, 0.25]
    for name, kernel in (("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)):
        weight = getattr(head, name).weight
        assert weight.shape == (3, 3, kernel, kernel) and getattr(head, name).bias is None
        filt = _bilinear_1d(kernel)
        for i in range(3):
            for j in range(3):  # each class upsampled on its own
                expected = torch.outer(filt, filt) if i == j else torch.zeros(kernel, kernel)
                torch.testing.assert_close(weight[i, j], expected, rtol=0, atol=1e-7)
    # FCN-AlexNet's odd 63-tap kernel (the reference net's) is bilinear too.
    up = build_model(backbone="alexnet", head="fcn32s", num_classes=2).head.upscore
    torch.testing.assert_close(up.weight[1, 1], torch.outer(_bilinear_1d(63), _bilinear_1d(63)))


def test_upsampling_interpolates_a_ramp_and_can_be_frozen():
    head = build_model(backbone="vgg_tiny", head="fcn16s", num_classes=1).head
    ramp = torch.arange(10.0).view(1, 1, 1, 10).expand(1, 1, 10, 10)
    with torch.no_grad():
        up = head.upscore2(ramp)[0, 0]  # kernel 4, stride 2: cell t sits at (t - 1.5) / 2
    interior = torch.arange(4, 16)
    torch.testing.assert_close(up[8, interior], (interior - 1.5) / 2)
    assert head.upscore2.weight.requires_grad
    frozen = build_model(
        backbone="vgg_tiny",
        head="fcn16s",
        num_classes=1,
        head_options={"learnable_upsample": False},
    ).head
    assert not frozen.upscore2.weight.requires_grad and not frozen.upscore16.weight.requires_grad
    assert frozen.score_pool4.weight.requires_grad


def test_score_layers_start_at_zero():
    model = build_model(backbone="vgg_tiny", head="fcn8s", num_classes=4)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = getattr(model.head, name)
        assert not layer.weight.any() and not layer.bias.any(), name


# ---------------------------------------------------------------- alignment
def test_crop_offsets_and_kernels_are_the_reference_nets():
    """voc-fcn32s/16s/8s (VGG16) and voc-fcn-alexnet: crops and deconvolution kernels."""
    expected = {
        ("vgg16", "fcn32s"): ({"input": 19}, {"upscore": 64}),
        ("vgg16", "fcn16s"): ({"pool4": 5, "input": 27}, {"upscore2": 4, "upscore16": 32}),
        ("vgg16", "fcn8s"): (
            {"pool4": 5, "pool3": 9, "input": 31},
            {"upscore2": 4, "upscore_pool4": 4, "upscore8": 16},
        ),
        ("alexnet", "fcn32s"): ({"input": 18}, {"upscore": 63}),
    }
    for (backbone, head), (offsets, kernels) in expected.items():
        model = _meta_model(backbone, head)
        assert model.head.crop_offsets == offsets, (backbone, head)
        assert model.head.upsample_kernels == kernels, (backbone, head)
    atonce = _meta_model("vgg16", "fcn8s_atonce").head
    assert atonce.crop_offsets == {"pool4": 5, "pool3": 9, "input": 31}


def _linearised(model: nn.Module) -> nn.Module:
    """The same geometry made linear: average pooling for max pooling, no ReLU, every
    convolution a uniform average. Then each output pixel is a weighted mean of input pixels
    whose centre of mass is exactly where the layers' alignment puts that pixel."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MaxPool2d):
                pool = nn.AvgPool2d(
                    child.kernel_size, child.stride, child.padding, child.ceil_mode, False
                )
                setattr(module, name, pool)
            elif isinstance(child, nn.ReLU):
                setattr(module, name, nn.Identity())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):  # not the (bilinear) transposed convolutions
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
    return model.eval()


@pytest.mark.parametrize(
    "backbone,head,options,size",
    [
        ("vgg_tiny", "fcn8s", {"batch_norm": False}, 480),
        ("vgg_tiny", "fcn32s", {"batch_norm": False}, 480),
        ("alexnet", "fcn8s", {}, 400),
        ("resnet50", "fcn8s", {}, 288),
    ],
)
def test_an_input_impulse_lands_on_its_own_pixel(backbone, head, options, size):
    """Output pixel (y, x) of each path (fc7 alone, pool4 alone, pool3 alone: one class each)
    draws on input pixels centred on (y, x): every crop offset is right to the pixel.

    The centre of the weights is measured with one backward pass: image c of a batch of
    identical zero images receives the gradient of class c's logit at (y, x).
    """
    paths = {"fcn32s": 1, "fcn16s": 2}.get(head, 3)
    model = _linearised(
        build_model(backbone=backbone, head=head, num_classes=paths, backbone_options=options)
    )
    with torch.no_grad():  # class 0 sees only fc7, class 1 only pool4, class 2 only pool3
        for cls, name in enumerate(("score_fr", "score_pool4", "score_pool3")[:paths]):
            layer = getattr(model.head, name)
            layer.weight.zero_()
            layer.weight[cls] = 1.0 / layer.in_channels
    image = torch.zeros(paths, 3, size, size, requires_grad=True)
    y, x = size // 2 - 7, size // 2 + 5
    logits = model(image)
    (grad,) = torch.autograd.grad(sum(logits[c, c, y, x] for c in range(paths)), image)
    coords = torch.arange(size, dtype=torch.float64)
    for cls in range(paths):
        weight = grad[cls].sum(0).double()
        assert weight.min() >= 0 and weight.sum() > 0
        cy = (weight.sum(1) * coords).sum() / weight.sum()
        cx = (weight.sum(0) * coords).sum() / weight.sum()
        # A crop off by one cell of pool3 is 8 pixels off, a final crop off by one 1 pixel;
        # the tolerance allows for the little weight that falls outside the image.
        assert abs(cy - y) < 0.05 and abs(cx - x) < 0.05, (cls, cy.item() - y, cx.item() - x)


# ---------------------------------------------------------------- parameter counts
def _vgg16_fcn_params(head: str, c: int) -> int:
    """From the published layer list: 13 3x3 convolutions, fc6 7x7x512 -> 4096, fc7 1x1, 1x1
    score layers, bias-free C x C deconvolutions."""
    widths = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(cin * cout * 9 + cout for cin, cout in zip(widths, widths[1:]))
    fc = (512 * 7 * 7 * 4096 + 4096) + (4096 * 4096 + 4096)
    score_fr, score_pool4, score_pool3 = 4096 * c + c, 512 * c + c, 256 * c + c
    up = {
        "fcn32s": c * c * 64 * 64,
        "fcn16s": score_pool4 + c * c * (4 * 4 + 32 * 32),
        "fcn8s": score_pool4 + score_pool3 + c * c * (4 * 4 + 4 * 4 + 16 * 16),
    }[head]
    return convs + fc + score_fr + up


def _alexnet_fcn_params(head: str, c: int) -> int:
    """torchvision's AlexNet widths; the heads' odd kernels (FCN-AlexNet's 63 for 32x)."""
    convs = (3 * 64 * 121 + 64) + (64 * 192 * 25 + 192) + (192 * 384 * 9 + 384)
    convs += (384 * 256 * 9 + 256) + (256 * 256 * 9 + 256)
    fc = (256 * 6 * 6 * 4096 + 4096) + (4096 * 4096 + 4096)
    up = {
        "fcn32s": c * c * 63 * 63,
        "fcn16s": (192 * c + c) + c * c * (3 * 3 + 31 * 31),
        "fcn8s": (192 * c + c) + (64 * c + c) + c * c * (3 * 3 + 3 * 3 + 15 * 15),
    }[head]
    return convs + fc + (4096 * c + c) + up


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    assert _vgg16_fcn_params("fcn8s", 21) == 134_489_759  # the reference voc-fcn8s
    for head in ("fcn32s", "fcn16s", "fcn8s"):
        for c in (21, 19):
            assert _count(_meta_model("vgg16", head, c)) == _vgg16_fcn_params(head, c), head
            assert _count(_meta_model("alexnet", head, c)) == _alexnet_fcn_params(head, c), head
    assert _count(_meta_model("vgg16", "fcn8s_atonce")) == 134_489_759
    # ResNet-50: torchvision's 25,557,032 (its fc now a 1x1 convolution), then the head.
    assert _count(torchvision.models.resnet50()) == 25_557_032
    c = 21
    head = (1000 * c + c) + (1024 * c + c) + (512 * c + c) + c * c * (3 * 3 + 3 * 3 + 15 * 15)
    assert _count(_meta_model("resnet50", "fcn8s", c)) == 25_557_032 + head
    without_fc = 25_557_032 - (2048 * 1000 + 1000)
    head = (2048 * c + c) + c * c * 63 * 63
    assert _count(_meta_model("resnet50", "fcn32s", c, fc=False)) == without_fc + head


# ---------------------------------------------------------------- at-once scaling
def test_atonce_scales_pool4_and_pool3_before_scoring():
    """Scaling a feature before a 1x1 convolution = scaling the convolution's weights."""
    torch.manual_seed(0)
    atonce = build_model(backbone="vgg_tiny", head="fcn8s_atonce", num_classes=3).eval()
    staged = build_model(backbone="vgg_tiny", head="fcn8s", num_classes=3).eval()
    with torch.no_grad():
        for layer in (atonce.head.score_fr, atonce.head.score_pool4, atonce.head.score_pool3):
            nn.init.normal_(layer.weight)
            nn.init.normal_(layer.bias)
        state = atonce.state_dict()
        staged.load_state_dict(state)
        staged.head.score_pool4.weight.mul_(0.01)
        staged.head.score_pool3.weight.mul_(1e-4)
        x = torch.randn(1, 3, 45, 38)
        torch.testing.assert_close(atonce(x), staged(x), rtol=1e-5, atol=1e-5)
    assert atonce.head.skip_scales == {"pool4": 0.01, "pool3": 1e-4}


# ---------------------------------------------------------------- ImageNet weights
def test_alexnet_and_resnet_load_torchvision_weights():
    """At 224 with torchvision's own padding the backbones compute torchvision's layers."""
    torch.manual_seed(0)
    tv = torchvision.models.alexnet().eval()
    ours = backbones.alexnet(first_padding=2).eval()
    ours.load_torchvision(tv.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        fc7 = ours(x)["fc7"]
        expected = tv.classifier[:6](torch.flatten(tv.avgpool(tv.features(x)), 1))
    assert fc7.shape == (2, 4096, 1, 1)
    torch.testing.assert_close(fc7[..., 0, 0], expected, rtol=1e-4, atol=1e-5)

    tv = torchvision.models.resnet50().eval()
    ours = backbones.resnet50().eval()
    ours.load_torchvision(tv.state_dict())
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        feats = ours(x)
        torch.testing.assert_close(feats["fc7"].mean((2, 3)), tv(x), rtol=1e-4, atol=1e-4)
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "pool3": (512, 12, 8),
        "pool4": (1024, 6, 4),
        "fc7": (1000, 3, 2),
    }


@pytest.mark.slow
def test_vgg16_loads_torchvision_weights():
    torch.manual_seed(0)
    tv = torchvision.models.vgg16().eval()
    ours = backbones.vgg16(first_padding=1).eval()
    ours.load_torchvision(tv.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = tv.classifier[:5](torch.flatten(tv.features(x), 1))
        torch.testing.assert_close(ours(x)["fc7"][..., 0, 0], expected, rtol=1e-4, atol=1e-5)


def test_backbone_weights_from_the_wrong_file_say_so(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    for build in (backbones.alexnet, backbones.resnet50, backbones.vgg_tiny):
        with pytest.raises(UserError, match=f"backbone.weights={path} is not a torchvision"):
            build(weights=path)
    notes = tmp_path / "notes.txt"
    notes.write_text("101 reasons\n")
    for build in (backbones.alexnet, backbones.resnet50, backbones.vgg_tiny_encoder):
        with pytest.raises(UserError, match=f"backbone.weights={tmp_path} is a directory, not a"):
            build(weights=tmp_path)
        with pytest.raises(UserError) as err:
            build(weights=notes)
        assert str(err.value) == (
            f"backbone.weights={notes} is not a readable PyTorch checkpoint file: it is a text "
            f"file, not one that torch.save writes"
        )
    with pytest.raises(UserError, match="vgg_tiny has no pretrained weights"):
        backbones.vgg_tiny(pretrained=True)


def test_offline_pretrained_weights_say_what_to_do(monkeypatch):
    """No network: one sentence naming the file to fetch, where it goes, and the other ways."""
    from urllib.error import URLError

    from torchvision.models import VGG16_Weights

    def offline(self, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(VGG16_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with torch.device("meta"), pytest.raises(UserError) as err:
        backbones.vgg16(pretrained=True)
    message = str(err.value)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    assert message.startswith("could not download torchvision's ImageNet vgg16 weights")
    assert f"put {VGG16_Weights.IMAGENET1K_V1.url} at {cached}" in message
    assert "backbone.weights=PATH" in message and "backbone.pretrained=false" in message
    assert "\n" not in message


# VGG-16's stages, then the tensors of a convolution, a BatchNorm and fc6/fc7, by name: the keys
# that checkpoints and the torchfcn importer rely on.
_STAGES = (2, 2, 3, 3, 3)
_CONV = ("weight", "bias")
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _vgg_keys(*, batch_norm: bool, fc: bool, fc_batch_norm: bool) -> list[str]:
    keys = []
    for s, n in enumerate(_STAGES, start=1):
        for i in range(1, n + 1):
            keys += [f"features.conv{s}_{i}.{p}" for p in _CONV]
            keys += [f"features.bn{s}_{i}.{p}" for p in _BN] if batch_norm else []
    for layer in ("6", "7") if fc else ():
        keys += [f"fc.fc{layer}.{p}" for p in _CONV]
        keys += [f"fc.bnfc{layer}.{p}" for p in _BN] if fc_batch_norm else []
    return keys


@pytest.mark.parametrize(
    "name,options,batch_norm,fc,fc_batch_norm",
    [
        ("vgg16", {}, False, True, False),
        ("vgg16_bn", {}, True, True, False),
        ("vgg_tiny", {}, True, True, False),
        ("vgg16_encoder", {}, False, False, False),
        ("vgg16_encoder", {"fc": True}, False, True, False),
        ("vgg16_bn_encoder", {}, True, False, False),
        ("vgg16_bn_encoder", {"fc": True}, True, True, True),
        ("vgg_tiny_encoder", {"fc": True}, True, True, True),
    ],
)
def test_vgg_state_dict_keys(name, options, batch_norm, fc, fc_batch_norm):
    with torch.device("meta"):
        model = getattr(backbones, name)(**options)
    expected = _vgg_keys(batch_norm=batch_norm, fc=fc, fc_batch_norm=fc_batch_norm)
    assert list(model.state_dict()) == expected


def test_feature_info_of_the_backbones():
    """Coordinate maps computed by hand: cell y of a map sits on input pixel stride*y+origin.

    VGG16: conv1_1's padding of 100 puts its output at -99; each 2x2 pooling adds half its
    input stride (pool3 -95.5, pool4 -91.5, pool5 -83.5); the valid 7x7 fc6 adds 3 x 32.
    AlexNet: conv1 (11x11, stride 4, pad 100) at 5 - 100; 3x3 poolings add their input stride.
    ResNet: every layer is padded by half its kernel: origin 0.
    """
    info = _meta_model("vgg16", "fcn8s").backbone.feature_info
    assert (info["pool3"].stride, info["pool3"].origin) == (8, -95.5)
    assert (info["pool4"].stride, info["pool4"].origin) == (16, -91.5)
    assert (info["fc7"].stride, info["fc7"].origin, info["fc7"].channels) == (32, 12.5, 4096)
    info = _meta_model("alexnet", "fcn8s").backbone.feature_info
    assert (info["pool3"].stride, info["pool3"].origin, info["pool3"].channels) == (8, -91, 64)
    assert (info["pool4"].stride, info["pool4"].origin, info["pool4"].channels) == (16, -83, 192)
    assert (info["fc7"].stride, info["fc7"].origin) == (32, -67 + 32 * 2.5)
    info = _meta_model("resnet101", "fcn8s").backbone.feature_info
    assert [(i.channels, i.stride, i.origin) for i in info.values()] == [
        (512, 8, 0),
        (1024, 16, 0),
        (1000, 32, 0),
    ]


# ---------------------------------------------------------------- staged initialisation
def test_staged_init_copies_every_shared_layer_and_keeps_the_coarser_output():
    torch.manual_seed(0)
    fcn32s = build_model(backbone="vgg_tiny", head="fcn32s", num_classes=4).eval()
    with torch.no_grad():  # a "trained" coarse net: non-zero scores
        nn.init.normal_(fcn32s.head.score_fr.weight, std=0.1)
        nn.init.normal_(fcn32s.head.score_fr.bias)
    fcn16s = build_model(backbone="vgg_tiny", head="fcn16s", num_classes=4).eval()
    report = copy_shared(fcn16s, fcn32s.state_dict(), source="fcn32s")
    backbone = {k for k in fcn32s.state_dict() if k.startswith("backbone.")}
    assert set(report.copied) == backbone | {"head.score_fr.weight", "head.score_fr.bias"}
    assert report.fresh == [
        "head.upscore2.weight",
        "head.score_pool4.weight",
        "head.score_pool4.bias",
        "head.upscore16.weight",
    ]
    assert report.unused == ["head.upscore.weight"] and report.mismatched == []
    for key in report.copied:
        torch.testing.assert_close(fcn16s.state_dict()[key], fcn32s.state_dict()[key])
    summary = report.summary()
    assert "backbone (all 28 layers), head.score_fr" in summary
    assert "head.upscore2, head.score_pool4, head.upscore16" in summary
    # With score_pool4 at zero, the new net starts from the coarse net's scores, upsampled in
    # two bilinear steps (computed here by hand) instead of one: nearly the coarse prediction.
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        coarse, fine = fcn32s(x), fcn16s(x)
        scores = fcn32s.head.score_fr(fcn32s.backbone(x)["fc7"])
        eye = torch.eye(4)[:, :, None, None]
        up = F.conv_transpose2d(scores, eye * torch.outer(*[_bilinear_1d(4)] * 2), stride=2)
        up = F.conv_transpose2d(up, eye * torch.outer(*[_bilinear_1d(32)] * 2), stride=16)
    torch.testing.assert_close(fine, up[..., 27 : 27 + 128, 27 : 27 + 96], rtol=1e-5, atol=1e-5)
    inner = (..., slice(32, -32), slice(32, -32))
    assert (fine - coarse)[inner].abs().max() < 0.1 * coarse[inner].abs().max()

    fcn8s = build_model(backbone="vgg_tiny", head="fcn8s", num_classes=4).eval()
    report = copy_shared(fcn8s, fcn16s.state_dict())
    assert {"head.upscore2.weight", "head.score_pool4.weight"} <= set(report.copied)
    assert report.fresh == [
        "head.upscore_pool4.weight",
        "head.score_pool3.weight",
        "head.score_pool3.bias",
        "head.upscore8.weight",
    ]


def test_staged_init_from_checkpoints(tmp_path):
    from fcnseg.utils.checkpoint import save_checkpoint

    source = build_model(backbone="vgg_tiny", head="fcn32s", num_classes=5)
    path = tmp_path / "fcn32s.pt"
    save_checkpoint({"model": source.state_dict(), "config": {}}, path)
    other_classes = build_model(backbone="vgg_tiny", head="fcn8s", num_classes=3)
    report = init_from_checkpoint(other_classes, path)
    assert report.mismatched == ["head.score_fr.weight", "head.score_fr.bias"]
    assert "shape differs from the source's): head.score_fr" in report.summary()
    with pytest.raises(UserError, match="model.init_from=.* does not exist"):
        init_from_checkpoint(other_classes, tmp_path / "missing.pt")
    unrelated = tmp_path / "unrelated.pt"
    save_checkpoint({"model": nn.Linear(2, 2).state_dict(), "config": {}}, unrelated)
    with pytest.raises(UserError, match="shares no layer with this model"):
        init_from_checkpoint(other_classes, unrelated)
