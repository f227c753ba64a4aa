"""The max-unpooling models: SegNet and DeconvNet heads on the index-returning VGG encoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, compose_config, run_script
from hydra.utils import instantiate
from torch import nn

from fcnseg import build_model, load_model
from fcnseg.data import SyntheticShapes, build_transforms
from fcnseg.errors import UserError
from fcnseg.models.backbones import vgg_tiny, vgg_tiny_encoder
from fcnseg.models.layers import max_pool2d_window_argmax, max_unpool2d_window_argmax

HEADS = {"segnet": {"fc": False}, "deconvnet": {"fc": True}}


def tiny(head: str, num_classes: int = 5):
    return build_model(
        backbone="vgg_tiny_encoder",
        head=head,
        num_classes=num_classes,
        backbone_options=HEADS[head],
    )


# ----------------------------------------------------------------------------- unpooling itself
# Two 5x5 channels with distinct values. Ceil-mode 2x2 pooling sees the windows rows {0,1}, {2,3},
# {4} x cols {0,1}, {2,3}, {4}; the maxima and their flat positions (row * 5 + col) are written
# out by hand below.
PLANE = [
    [1, 20, 3, 4, 12],
    [6, 7, 8, 24, 5],
    [19, 2, 13, 9, 10],
    [11, 14, 21, 15, 22],
    [0, 23, 16, 17, 18],
]
POOLED = [[[20, 24, 12], [19, 21, 22], [23, 17, 18]], [[20, 19, 23], [24, 21, 17], [12, 22, 18]]]
# In the transpose, the maximum 20 found at (0, 1) of channel 0 sits at (1, 0): index 5; etc.
INDICES = [[[1, 8, 4], [10, 17, 19], [21, 23, 24]], [[5, 2, 9], [16, 13, 19], [20, 23, 24]]]


def test_unpooling_puts_values_exactly_where_pooling_found_the_maxima():
    model = tiny("segnet")
    pool, unpool = model.backbone.features["pool1"], model.head.stage1.unpool1
    plane = torch.tensor(PLANE, dtype=torch.float32)
    x = torch.stack([plane, plane.T])[None]  # the transpose has its maxima elsewhere
    pooled, indices = pool(x)
    assert pooled[0].tolist() == POOLED
    assert indices[0].tolist() == INDICES
    # Unpool other values (100 + k at window k): each must land at its window's argmax.
    values = 100 + torch.arange(18, dtype=torch.float32).view(1, 2, 3, 3)
    out = unpool(values, indices, output_size=x.shape[-2:])
    expected = torch.zeros(1, 2, 25)
    for c in range(2):
        for k in range(9):
            expected[0, c, INDICES[c][k // 3][k % 3]] = 100 + 9 * c + k
    assert out.shape == (1, 2, 5, 5)
    assert torch.equal(out.view(1, 2, 25), expected)


def test_window_argmax_unpooling_puts_values_where_pooling_found_the_maxima():
    """The export's scatter-free pair on the hand-checked planes: each value lands at its
    window's argmax (the INDICES above), zeros elsewhere."""
    plane = torch.tensor(PLANE, dtype=torch.float32)
    x = torch.stack([plane, plane.T])[None]
    pooled, where = max_pool2d_window_argmax(x)
    assert pooled[0].tolist() == POOLED
    values = 100 + torch.arange(18, dtype=torch.float32).view(1, 2, 3, 3)
    out = max_unpool2d_window_argmax(values, where, x.shape[-2:])
    assert out.shape == (1, 2, 5, 5)
    expected = torch.zeros(1, 2, 25)
    for c in range(2):
        for k in range(9):
            expected[0, c, INDICES[c][k // 3][k % 3]] = 100 + 9 * c + k
    assert torch.equal(out.reshape(1, 2, 25), expected)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 5), (7, 4), (33, 47), (64, 64)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_window_argmax_unpooling_equals_pytorchs_with_ties(size, layout):
    """Inputs of three values tie in most windows: the first maximum in row-major order is the
    one PyTorch's pooling records, and the one the scatter-free unpooling uses."""
    x = torch.randint(0, 3, (2, 3, *size), generator=torch.Generator().manual_seed(0)).float()
    x = x.contiguous(memory_format=layout)
    pooled, indices = F.max_pool2d(x, 2, stride=2, ceil_mode=True, return_indices=True)
    values = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1))
    want = F.max_unpool2d(values, indices, 2, stride=2, output_size=size)
    got_pooled, where = max_pool2d_window_argmax(x)
    assert torch.equal(got_pooled, pooled)
    assert torch.equal(max_unpool2d_window_argmax(values, where, size), want)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_each_decoder_stage_unpools_with_its_encoder_stage_indices(head):
    model = tiny(head).eval()
    recorded, used = {}, {}
    for s in range(1, 6):
        pool, unpool = model.backbone.features[f"pool{s}"], getattr(model.head, f"stage{s}")[0]
        pool.register_forward_hook(
            lambda m, inp, out, s=s: recorded.__setitem__(s, (out[1], inp[0].shape[-2:]))
        )
        unpool.register_forward_hook(
            lambda m, args, kwargs, out, s=s: used.__setitem__(s, (args[1], kwargs["output_size"])),
            with_kwargs=True,
        )
    with torch.no_grad():
        model(torch.randn(1, 3, 23, 37))
    assert sorted(used) == sorted(recorded) == [1, 2, 3, 4, 5]
    for s in range(1, 6):
        assert used[s][0] is recorded[s][0]
        assert tuple(used[s][1]) == tuple(recorded[s][1])


def test_pairing_is_visible_in_the_module_tree():
    for head in HEADS:
        model = tiny(head)
        pools = [n for n, m in model.backbone.features.items() if isinstance(m, nn.MaxPool2d)]
        assert pools == [f"pool{s}" for s in range(1, 6)]
        assert all(model.backbone.features[p].return_indices for p in pools)
        text = str(model)
        for s in range(1, 6):
            assert f"(unpool{s}): MaxUnpool2d(kernel_size=(2, 2), stride=(2, 2)" in text
            assert f"indices from pool{s}" in text


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("size", [(1, 1), (7, 5), (33, 47), (45, 61)])
def test_odd_sizes_round_trip_at_every_stage(head, size):
    model = tiny(head).eval()
    pooled_from, unpooled_to = {}, {}
    for name, m in model.backbone.features.items():
        if isinstance(m, nn.MaxPool2d):
            m.register_forward_hook(
                lambda mod, inp, out, name=name: pooled_from.__setitem__(name, inp[0].shape)
            )
    for s in range(1, 6):
        unpool = getattr(model.head, f"stage{s}")[0]
        unpool.register_forward_hook(
            lambda mod, inp, out, s=s: unpooled_to.__setitem__(f"pool{s}", out.shape)
        )
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size)
    assert unpooled_to == pooled_from and len(pooled_from) == 5


# ----------------------------------------------------------------------------- reference nets
def _stage_widths():
    return [(64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)]


# segnet_train.prototxt (SegNet-Tutorial), decoder: (name, in, out, kernel); conv1_1_D scores.
SEGNET_DECODER = [
    ("conv5_3_D", 512, 512, 3), ("conv5_2_D", 512, 512, 3), ("conv5_1_D", 512, 512, 3),
    ("conv4_3_D", 512, 512, 3), ("conv4_2_D", 512, 512, 3), ("conv4_1_D", 512, 256, 3),
    ("conv3_3_D", 256, 256, 3), ("conv3_2_D", 256, 256, 3), ("conv3_1_D", 256, 128, 3),
    ("conv2_2_D", 128, 128, 3), ("conv2_1_D", 128, 64, 3),
    ("conv1_2_D", 64, 64, 3), ("conv1_1_D", 64, 11, 3),
]  # fmt: skip
# DeconvNet_inference_deploy.prototxt, decoder (seg-score is a 1x1 convolution).
DECONVNET_DECODER = [
    ("deconv", 4096, 512, 7),
    ("deconv5_1", 512, 512, 3), ("deconv5_2", 512, 512, 3), ("deconv5_3", 512, 512, 3),
    ("deconv4_1", 512, 512, 3), ("deconv4_2", 512, 512, 3), ("deconv4_3", 512, 256, 3),
    ("deconv3_1", 256, 256, 3), ("deconv3_2", 256, 256, 3), ("deconv3_3", 256, 128, 3),
    ("deconv2_1", 128, 128, 3), ("deconv2_2", 128, 64, 3),
    ("deconv1_1", 64, 64, 3), ("deconv1_2", 64, 64, 3),
    ("seg_score", 64, 21, 1),
]  # fmt: skip


def _convs(module: nn.Module) -> list[tuple[str, int, int, int]]:
    return [
        (name.rsplit(".", 1)[-1], m.in_channels, m.out_channels, m.kernel_size[0])
        for name, m in module.named_modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]


def _reference_params(encoder_fc: bool, decoder, classifier: str) -> int:
    """Parameters of VGG16-BN encoder + decoder, counted from the layer lists alone."""
    total, cin = 0, 3
    for widths in _stage_widths():
        for w in widths:
            total += 9 * cin * w + w + 2 * w  # conv weight + bias, BN scale + shift
            cin = w
    if encoder_fc:
        total += 49 * 512 * 4096 + 4096 + 2 * 4096 + 4096 * 4096 + 4096 + 2 * 4096
    for name, i, o, k in decoder:
        total += k * k * i * o + o + (0 if name == classifier else 2 * o)
    return total


@pytest.mark.parametrize(
    "head,num_classes,reference,classifier",
    [
        ("segnet", 11, SEGNET_DECODER, "conv1_1_D"),
        ("deconvnet", 21, DECONVNET_DECODER, "seg_score"),
    ],
)
@pytest.mark.parametrize("backbone", ["vgg16_bn_encoder", "vgg16_bn"])
def test_vgg16_variants_match_the_reference_layer_lists(
    backbone, head, num_classes, reference, classifier
):
    """The encoder by its own name, or vgg16_bn built as the head asks: the same net."""
    options = HEADS[head] if backbone.endswith("_encoder") else {}
    with torch.device("meta"):  # layer shapes only, no memory
        model = build_model(
            backbone=backbone, head=head, num_classes=num_classes, backbone_options=options
        )
    assert _convs(model.head) == reference
    encoder = _convs(model.backbone)
    expected = [
        (f"conv{s}_{i}", ([3] + [w for ws in _stage_widths() for w in ws])[n], w, 3)
        for n, (s, i, w) in enumerate(
            (s, i, w) for s, ws in enumerate(_stage_widths(), 1) for i, w in enumerate(ws, 1)
        )
    ]
    if HEADS[head]["fc"]:
        expected += [("fc6", 512, 4096, 7), ("fc7", 4096, 4096, 1)]
    assert encoder == expected
    params = sum(p.numel() for p in model.parameters())
    assert params == _reference_params(HEADS[head]["fc"], reference, classifier)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize(
    "plain,encoder", [("vgg16", "vgg16_encoder"), ("vgg16_bn", "vgg16_bn_encoder"),
                      ("vgg_tiny", "vgg_tiny_encoder")],
)  # fmt: skip
def test_a_plain_vgg_name_builds_the_encoder_the_head_asks_for(head, plain, encoder):
    """build_model(backbone="vgg16", head="deconvnet") needs no options: the same tensors under
    the same names as the encoder configured by hand (checkpoints load either way)."""
    with torch.device("meta"):
        by_head = build_model(backbone=plain, head=head, num_classes=3)
        by_hand = build_model(
            backbone=encoder, head=head, num_classes=3, backbone_options=HEADS[head]
        )
    shapes = {k: v.shape for k, v in by_head.state_dict().items()}
    assert shapes == {k: v.shape for k, v in by_hand.state_dict().items()}
    assert str(by_head) == str(by_hand)
    assert by_head.backbone.feature_info == by_hand.backbone.feature_info


# ----------------------------------------------------------------------------- ImageNet weights
def _torchvision_style_tiny(fc_in: int) -> nn.Module:
    """A torchvision-format VGG at vgg_tiny widths: ``features.N`` and ``classifier.{0,3,6}``."""
    from torchvision.models.vgg import make_layers

    cfg = [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M"]
    net = nn.Module()
    net.features = make_layers(cfg, batch_norm=True)
    net.classifier = nn.Sequential(
        nn.Linear(fc_in, 512), nn.ReLU(), nn.Dropout(),
        nn.Linear(512, 512), nn.ReLU(), nn.Dropout(),
        nn.Linear(512, 1000),
    )  # fmt: skip
    for m in net.modules():  # non-trivial BN statistics, so a wrong mapping shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def test_torchvision_weights_give_torchvision_features():
    theirs = _torchvision_style_tiny(64 * 7 * 7)
    ours = vgg_tiny_encoder(fc=True)
    ours.load_torchvision(theirs.state_dict())
    ours.eval()
    x = torch.randn(1, 3, 224, 224)  # divisible by 32: ceil and floor pooling agree
    with torch.no_grad():
        feats = ours(x)
        pool5 = theirs.features(x)
        fc7 = theirs.classifier[:5](pool5.flatten(1))
    assert torch.equal(feats["pool5"], pool5)
    # bnfc6/bnfc7 start as identities up to their epsilon.
    torch.testing.assert_close(feats["fc7"].flatten(1), fc7, rtol=1e-4, atol=1e-5)


def test_mismatched_weights_are_a_user_error():
    theirs = _torchvision_style_tiny(64 * 7 * 7)
    with pytest.raises(UserError, match="convolution/BatchNorm layers"):
        vgg_tiny_encoder(batch_norm=False).load_torchvision(theirs.state_dict())


# ----------------------------------------------------------------------------- wrong pairings
@pytest.mark.parametrize(
    "backbone,options,head,message",
    [
        (vgg_tiny, {}, "segnet", "use an encoder backbone"),  # built without indices
        (vgg_tiny, {}, "deconvnet", "use an encoder backbone"),
        (lambda: vgg_tiny_encoder(fc=True), {}, "segnet", "backbone.fc=false"),
        (vgg_tiny_encoder, {}, "deconvnet", "backbone.fc=true"),
        ("vgg_tiny_encoder", {"fc": True}, "segnet", "needs backbone.fc=false, not"),
        ("vgg_tiny_encoder", {"fc": False}, "deconvnet", "needs backbone.fc=true, not"),
        ("vgg_tiny", {"indices": False}, "segnet", "needs backbone.indices=true, not"),
        ("resnet50", {}, "segnet", "which resnet50 cannot build; use a VGG backbone"),
        ("alexnet", {}, "deconvnet", "which alexnet cannot build; use a VGG backbone"),
    ],
)
def test_wrong_backbone_is_one_clear_sentence(backbone, options, head, message):
    if callable(backbone):  # a built backbone: the head itself finds what is missing
        backbone = backbone()
    with pytest.raises(UserError, match=message) as err:
        build_model(backbone=backbone, head=head, num_classes=3, backbone_options=options)
    assert "\n" not in str(err.value)


def test_an_encoder_pads_conv1_1_by_one():
    with pytest.raises(UserError, match="backbone.first_padding=100 would change the size"):
        build_model(
            backbone="vgg_tiny", head="segnet", num_classes=3,
            backbone_options={"first_padding": 100},
        )  # fmt: skip


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("head", sorted(HEADS))
def test_a_few_iterations_reduce_the_loss(head):
    torch.manual_seed(0)
    data = SyntheticShapes(
        split="train",
        num_samples=4,
        min_size=32,
        max_size=32,
        transform=build_transforms(train=False),
    )
    images, masks = (torch.stack(t) for t in zip(*(data[i] for i in range(4))))
    model = tiny(head)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert max(losses[-2:]) < 0.85 * losses[0], losses


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize("head", sorted(HEADS))
def test_head_presets_compose_and_train_two_iterations(head):
    """A head config describes the head alone; the backbone, whichever is chosen, is built as
    the encoder the head asks for."""
    cfg = compose_config([f"head={head}"])
    assert cfg.backbone._target_.endswith(".vgg_tiny")  # the default, untouched by the head
    assert cfg.backbone == compose_config().backbone
    num_classes = cfg.dataset.num_classes
    model = build_model(
        backbone=instantiate(cfg.backbone), head=instantiate(cfg.head), num_classes=num_classes
    )
    assert all(model.backbone.features[f"pool{s}"].return_indices for s in range(1, 6))
    assert ("fc7" in model.backbone.feature_info) == HEADS[head]["fc"]
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    images, masks = torch.randn(2, 3, 33, 31), torch.randint(0, num_classes, (2, 33, 31))
    for _ in range(2):
        loss = F.cross_entropy(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize(
    "backbone", ["vgg16", "vgg16_bn", "vgg19", "vgg16_encoder", "vgg16_bn_encoder", "vgg_tiny"]
)
def test_every_vgg_config_builds_under_the_unpooling_heads(backbone, head):
    """``head=deconvnet backbone=vgg16`` and the like, as scripts/train.py builds them."""
    cfg = compose_config([f"head={head}", f"backbone={backbone}", "backbone.pretrained=false"])
    with torch.device("meta"):
        model = build_model(
            backbone=instantiate(cfg.backbone), head=instantiate(cfg.head), num_classes=3
        )
        assert model.eval()(torch.empty(1, 3, 45, 61)).shape == (1, 3, 45, 61)
    assert ("fc7" in model.backbone.feature_info) == HEADS[head]["fc"]


def test_segnet_camvid_preset_is_the_published_setup():
    cfg = compose_config(["experiment=segnet_camvid"])
    assert cfg.dataset.name == "camvid" and cfg.dataset.num_classes == 11
    assert cfg.dataset.ignore_index not in range(11)  # void is ignored, not a class
    assert cfg.head._target_ == "fcnseg.models.heads.segnet"
    assert cfg.backbone._target_ == "fcnseg.models.backbones.vgg16_bn_encoder"
    assert cfg.backbone.pretrained and "fc" not in cfg.backbone
    with torch.device("meta"):
        model = build_model(
            backbone=instantiate(cfg.backbone, pretrained=False),
            head=instantiate(cfg.head),
            num_classes=cfg.dataset.num_classes,
        )
    assert "fc7" not in model.backbone.feature_info  # SegNet drops fc6/fc7
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum) == (1e-3, 0.9)
    assert cfg.scheduler._target_.endswith("ConstantLR") and cfg.trainer.batch_size == 4
    assert cfg.loss.class_weights == "median_frequency"
    assert cfg.dataset.crop_size is None and not cfg.dataset.hflip


@pytest.mark.slow
def test_segnet_camvid_runs_two_iterations_on_synthetic_data(tmp_path):
    run = tmp_path / "run"
    result = run_script(
        "train.py", "experiment=segnet_camvid", "dataset=synthetic", "backbone=vgg_tiny_encoder",
        *TINY_RUN, f"hydra.run.dir={run}", env={"FCNSEG_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "median-frequency class weights" in result.stdout + result.stderr
    assert len(list((tmp_path / "cache" / "class_weights").glob("median_frequency-*.json"))) == 1
    model = load_model(run / "checkpoints" / "last.pt")
    assert model.head.__class__.__name__ == "SegNetHead"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 37, 51)).shape == (1, 5, 37, 51)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_unpooling_heads_under_cpu_bf16_autocast(head):
    model = tiny(head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 29, 35))
    assert out.shape == (2, 5, 29, 35) and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unpooling_heads_under_cuda_autocast(head, dtype):
    model = tiny(head).cuda()
    x = torch.randn(2, 3, 45, 61, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = model(x)
    assert out.shape == (2, 5, 45, 61) and out.dtype == dtype
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
