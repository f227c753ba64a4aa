"""Whole-image, sliding-window and TTA inference against computations written out in the test."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcnseg import build_model
from fcnseg.engine.inference import Inference
from fcnseg.errors import UserError


class TinyFCN(nn.Module):
    """Conv, strided conv, 1x1 score, bilinear upsampling: cheap, but with a receptive field
    and zero padding, so a window's logits depend on where the window ends."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.score = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        return resize(self.score(self.body(x)), x.shape[-2:])


@pytest.fixture(scope="module")
def model():
    return TinyFCN().eval()


@pytest.fixture(scope="module")
def fcn8s():
    """A vgg_tiny FCN-8s whose score layers (zero-initialised, as in the paper) are randomised,
    so that the logits vary from pixel to pixel."""
    torch.manual_seed(0)
    net = build_model(backbone="vgg_tiny", head="fcn8s", num_classes=5).eval()
    with torch.no_grad():
        for p in net.head.parameters():
            p.normal_(0, 0.5)
    return net


def naive_slide(net, x, crop, stride):
    """Every window's logits summed on a full canvas and divided by a count map."""
    (ch, cw), (sh, sw) = crop, stride
    _, _, h, w = x.shape
    ch, cw = min(ch, h), min(cw, w)
    ys = sorted({min(y, h - ch) for y in range(0, max(h - ch, 0) + sh, sh)})
    xs = sorted({min(x0, w - cw) for x0 in range(0, max(w - cw, 0) + sw, sw)})
    acc, count = 0, torch.zeros(1, 1, h, w)
    for y in ys:
        for x0 in xs:
            logits = net(x[..., y : y + ch, x0 : x0 + cw])
            acc = acc + F.pad(logits, (x0, w - x0 - cw, y, h - y - ch))
            count[..., y : y + ch, x0 : x0 + cw] += 1
    assert ys[-1] + ch == h and xs[-1] + cw == w  # the windows reach the borders
    return acc / count


def resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def test_slide_equals_whole_when_one_window_covers_the_image(fcn8s):
    x = torch.randn(1, 3, 45, 70)
    whole = fcn8s(x)
    assert whole.abs().max() > 1  # the comparison is not between zeros
    for crop in [(45, 70), (64, 512)]:  # exactly the image, and larger (windows never exceed it)
        slide = Inference(mode="slide", crop_size=crop, stride=16).logits(fcn8s, x)
        assert torch.equal(slide, whole)


@torch.no_grad()
def test_slide_equals_whole_labels_for_cheap_model_too(model):
    x = torch.randn(2, 3, 33, 47)
    labels = Inference(mode="slide", crop_size=(40, 60), batch_size=3).predict(model, x)
    want = torch.cat([model(x[i : i + 1]) for i in range(2)]).argmax(1)
    assert torch.equal(labels, want)


@torch.no_grad()
@pytest.mark.parametrize("batch_size", [1, 4])
def test_slide_averages_overlapping_windows(model, batch_size):
    x = torch.randn(1, 3, 45, 70)
    got = Inference(
        mode="slide", crop_size=(24, 32), stride=(10, 13), batch_size=batch_size
    ).logits(model, x)
    want = naive_slide(model, x, (24, 32), (10, 13))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Windows see less context than the whole image: the results do differ.
    assert not torch.allclose(got, model(x), atol=1e-3)


class MirrorSymmetricNet(nn.Module):
    """A 3x3 convolution whose kernels are mirror-symmetric, with integer weights: on
    integer-valued images every sum is exact, so it commutes with a horizontal flip exactly."""

    def __init__(self, symmetric: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-3, 4, (4, 3, 3, 3), generator=g).float()
        if symmetric:
            w[..., 2] = w[..., 0]
        with torch.no_grad():
            self.conv.weight.copy_(w)
            self.conv.bias.copy_(torch.arange(4.0))

    def forward(self, x):
        return self.conv(x)


@torch.no_grad()
def test_flip_tta_of_a_mirror_symmetric_model_equals_no_tta():
    net = MirrorSymmetricNet()
    x = torch.randint(0, 8, (2, 3, 9, 14)).float()
    plain = net(x)
    assert torch.equal(net(x.flip(-1)).flip(-1), plain)  # the premise
    assert torch.equal(Inference(flip=True).logits(net, x), plain)
    slide = Inference(mode="slide", crop_size=(9, 14), flip=True).logits(net, x)
    assert torch.equal(slide, plain)


@torch.no_grad()
def test_flip_tta_averages_the_mirrored_view(model):
    x = torch.randn(1, 3, 41, 57)
    want = (model(x) + model(x.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(Inference(flip=True).logits(model, x), want, rtol=0, atol=1e-6)
    asymmetric = MirrorSymmetricNet(symmetric=False)
    xi = torch.randint(0, 8, (1, 3, 9, 14)).float()
    assert not torch.equal(Inference(flip=True).logits(asymmetric, xi), asymmetric(xi))


@torch.no_grad()
def test_multi_scale_flip_averages_at_full_resolution(model):
    x = torch.randn(1, 3, 45, 70)
    scales = [0.5, 0.75, 1.0, 1.5]
    want = 0
    for s in scales:
        for flip in (False, True):
            xi = resize(x.flip(-1) if flip else x, (round(45 * s), round(70 * s)))
            out = resize(model(xi), (45, 70))
            want = want + (out.flip(-1) if flip else out)
    got = Inference(scales=scales, flip=True).logits(model, x)
    torch.testing.assert_close(got, want / 8, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sliding_windows_at_several_scales(model):
    """Each scale's windows are averaged at that scale, then resized: the streaming band
    accumulation gives what a full canvas per scale gives."""
    x = torch.randn(1, 3, 45, 70)
    crop, stride = (24, 32), (14, 20)
    want = 0
    for s in (0.75, 1.5):
        for flip in (False, True):
            xi = resize(x.flip(-1) if flip else x, (round(45 * s), round(70 * s)))
            out = resize(naive_slide(model, xi, crop, stride), (45, 70))
            want = want + (out.flip(-1) if flip else out)
    inference = Inference(
        mode="slide", crop_size=crop, stride=stride, scales=[0.75, 1.5], flip=True, batch_size=2
    )
    torch.testing.assert_close(inference.logits(model, x), want / 4, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("scale", [0.1, 0.5, 1.3, 2.0])
def test_rowwise_resampling_matches_interpolate(scale):
    """A model that returns fixed random logits: the canvas then holds exactly their bilinear
    resize to the input's size, computed a few rows at a time."""
    size = (round(90 * scale), round(130 * scale))
    logits = torch.randn(1, 3, *size)

    class Fixed(nn.Module):
        def forward(self, x):
            assert x.shape[-2:] == size
            return logits

    got = Inference(scales=[scale]).logits(Fixed(), torch.zeros(1, 3, 90, 130))
    # PyTorch derives the source coordinates in float32 (steps of ~1e-5 at x ~ 100).
    torch.testing.assert_close(got, resize(logits, (90, 130)), rtol=1e-4, atol=1e-4)
    mirrored = Inference(scales=[scale], flip=True).logits(Fixed(), torch.zeros(1, 3, 90, 130))
    torch.testing.assert_close(mirrored, (got + got.flip(-1)) / 2, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_plain_inference_is_the_network_itself(model):
    x = torch.randn(3, 3, 33, 47)
    assert Inference().plain
    assert torch.equal(Inference().logits(model, x), model(x))


@pytest.mark.parametrize(
    ("options", "culprit"),
    [
        ({"mode": "tiles"}, "eval.mode='tiles'"),
        ({"mode": "slide"}, "eval.crop_size"),
        ({"mode": "slide", "crop_size": [0, 4]}, "eval.crop_size=[0, 4]"),
        ({"scales": []}, "eval.scales"),
        ({"scales": [1.0, -0.5]}, "eval.scales"),
        ({"batch_size": 0}, "eval.batch_size=0"),
    ],
)
def test_bad_options_name_the_key(options, culprit):
    with pytest.raises(UserError, match=culprit.replace("[", r"\[").replace("]", r"\]")):
        Inference(**options)


def test_from_options_ignores_unrelated_keys():
    inference = Inference.from_options(
        {"mode": "slide", "crop_size": 32, "flip": True, "save_predictions": None}
    )
    assert inference.crop_size == (32, 32) and inference.stride == (32, 32) and inference.flip
    assert inference.views == [(1.0, False), (1.0, True)]
