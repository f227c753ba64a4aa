"""Classifying images of any size: a converted classifier's score map pooled to one vector,
as VGG's dense evaluation does, over scales and the mirrored image; exported to ONNX."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from fcnseg.errors import UserError
from fcnseg.models.convert import DenseClassifier, classify, fully_convolutional


def _classifier(arch):
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None).eval()


def window_scores(classifier, images, window):
    """The classifier's own fully connected layers on every ``window`` of its pool5 map:
    (N, windows, K)."""
    with torch.no_grad():
        pool5 = classifier.features(images)
        n, c, h, w = pool5.shape
        crops = [
            pool5[:, :, i : i + window, j : j + window].flatten(1)
            for i in range(h - window + 1)
            for j in range(w - window + 1)
        ]
        return torch.stack([classifier.classifier(crop) for crop in crops], dim=1)


@pytest.fixture(scope="module")
def vgg16():
    return _classifier("vgg16")


def test_at_the_native_size_it_is_the_classifier(vgg16):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = vgg16(x)
    net = fully_convolutional(vgg16).eval()
    for pool in ("mean", "max"):  # one window: either pooling is the window's score
        torch.testing.assert_close(classify(net, x, pool=pool), want, rtol=1e-4, atol=1e-5)


def test_larger_images_pool_every_pool5_window(vgg16):
    x = torch.randn(1, 3, 256, 288)  # pool5 8x9: 2x3 windows of 7x7
    windows = window_scores(vgg16, x, 7)
    assert windows.shape == (1, 6, 1000)
    mean, peak = classify(vgg16, x), classify(vgg16, x, pool="max")
    torch.testing.assert_close(mean, windows.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(peak, windows.amax(1), rtol=1e-4, atol=1e-5)


def test_scales_and_mirror_average_the_views():
    alexnet = _classifier("alexnet")
    x = torch.randn(1, 3, 224, 224)
    views = []
    for scale in (1.0, 1.25):
        resized = x if scale == 1 else F.interpolate(x, scale_factor=scale, mode="bilinear")
        for image in (resized, resized.flip(-1)):
            views.append(window_scores(alexnet, image, 6).mean(1))
    assert window_scores(alexnet, F.interpolate(x, scale_factor=1.25), 6).shape[1] == 4
    got = classify(alexnet, x, scales=[1.0, 1.25], flip=True)
    torch.testing.assert_close(got, torch.stack(views).mean(0), rtol=1e-4, atol=1e-5)


def test_bad_options_are_one_sentence():
    alexnet = _classifier("alexnet")
    with pytest.raises(UserError, match="pool='sum' is not one of mean, max"):
        DenseClassifier(alexnet, pool="sum")
    with pytest.raises(UserError, match="scales"):
        DenseClassifier(alexnet, scales=[])


class SmallVGG(torch.nn.Module):
    """A classifier of torchvision's VGG layout (features, adaptive pooling, Linear layers) at a
    size whose export takes seconds: 32x32 native input, a 2x2 pool5 window."""

    def __init__(self):
        super().__init__()
        conv = [torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4)]
        conv += [torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4)]
        self.features = torch.nn.Sequential(*conv)
        self.avgpool = torch.nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def test_onnx_export_classifies_any_size(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fcnseg.deploy import OnnxModel, export_onnx

    torch.manual_seed(0)
    small = SmallVGG().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(classify(small, x), small(x), rtol=1e-4, atol=1e-5)
    model = DenseClassifier(small, pool="max", scales=[1.0, 1.5], flip=True).eval()
    session = OnnxModel(export_onnx(model, tmp_path / "classifier.onnx"))
    assert session.info is None  # no segmentation metadata for a classifier
    for size in [(32, 32), (67, 131), (40, 200)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            want = model(x)
        got = session(x)
        assert got.shape == (2, 10)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
