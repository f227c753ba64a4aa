"""fcnseg.models.convert: fully convolutional classifiers compute what the classifiers compute."""

import pytest
import torch
import torchvision
from torch import nn

from fcnseg.errors import UserError
from fcnseg.models.convert import FullyConvolutionalNet, fully_convolutional, linear_weight_as_conv


def _classifier(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None).eval()


@pytest.fixture(scope="module")
def vgg16():
    return _classifier("vgg16")


def test_vgg16_at_224_equals_the_classifier(vgg16):
    x = torch.randn(2, 3, 224, 224)
    dense = fully_convolutional(vgg16).eval()
    with torch.no_grad():
        scores = dense(x)
        expected = vgg16(x)
    assert scores.shape == (2, 1000, 1, 1)
    torch.testing.assert_close(scores[..., 0, 0], expected, rtol=1e-4, atol=1e-5)


def test_vgg16_on_384_scores_every_224_window_of_pool5(vgg16):
    """The 6x6 score map's cell (i, j) is the original FC layers applied to the 7x7 window at
    (i, j) of the pool5 map that the original convolutions compute on the whole image."""
    x = torch.randn(1, 3, 384, 384)
    dense = fully_convolutional(vgg16).eval()
    assert dense.features is vgg16.features  # the convolutions are the classifier's own
    pool5 = {}
    hook = vgg16.features.register_forward_hook(lambda m, i, out: pool5.setdefault("map", out))
    try:
        with torch.no_grad():
            scores = dense(x)
    finally:
        hook.remove()
    assert pool5["map"].shape == (1, 512, 12, 12)  # 384 / 32
    assert scores.shape == (1, 1000, 6, 6)  # 12 - 7 + 1 windows a side
    windows = torch.stack(
        [pool5["map"][0, :, i : i + 7, j : j + 7].flatten() for i in range(6) for j in range(6)]
    )
    with torch.no_grad():
        expected = vgg16.classifier(windows)  # the Linear layers, untouched, on each window
    got = scores[0].flatten(1).T  # (36, 1000), row i * 6 + j
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # Window (i, j) is the 224 crop at (32 i, 32 j): the net's coordinate map says so.
    assert (dense.stride, dense.origin) == (32, 111.5)  # centre of pixels 0 ... 223


def test_alexnet_at_224_equals_the_classifier():
    alexnet = _classifier("alexnet")
    x = torch.randn(2, 3, 224, 224)
    dense = fully_convolutional(alexnet).eval()
    assert dense.window == (6, 6)
    with torch.no_grad():
        scores, expected = dense(x), alexnet(x)
    assert scores.shape == (2, 1000, 1, 1)
    torch.testing.assert_close(scores[..., 0, 0], expected, rtol=1e-4, atol=1e-6)
    # A larger input gives a larger map, which the dropped adaptive pooling would have squashed.
    with torch.no_grad():
        assert dense(torch.randn(1, 3, 320, 288)).shape == (1, 1000, 4, 3)


def test_batchnorm_vgg_converts():
    vgg = _classifier("vgg11_bn")
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in vgg.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(
            fully_convolutional(vgg).eval()(x)[..., 0, 0], vgg(x), rtol=1e-4, atol=1e-5
        )


def test_resnet_score_map_averages_to_the_classifier():
    resnet = _classifier("resnet18")
    x = torch.randn(1, 3, 256, 192)
    dense = fully_convolutional(resnet).eval()
    with torch.no_grad():
        scores, expected = dense(x), resnet(x)
    assert scores.shape == (1, 1000, 8, 6)
    torch.testing.assert_close(scores.mean((2, 3)), expected, rtol=1e-4, atol=1e-5)


def test_linear_weights_become_conv_kernels_in_flatten_order():
    """Reshaping (out, C*h*w) to (out, C, h, w) matches torch.flatten's C, h, w order."""
    linear = nn.Linear(3 * 2 * 2, 5)
    conv_weight = linear_weight_as_conv(linear.weight, (5, 3, 2, 2))
    x = torch.randn(4, 3, 2, 2)
    by_conv = torch.nn.functional.conv2d(x, conv_weight, linear.bias)[..., 0, 0]
    torch.testing.assert_close(by_conv, linear(x.flatten(1)))
    with pytest.raises(UserError, match="can stand for"):
        linear_weight_as_conv(linear.weight, (5, 3, 3, 3))


def test_conversion_keeps_training_mode_and_leaves_the_model_alone():
    alexnet = _classifier("alexnet").train()
    before = {k: v.clone() for k, v in alexnet.state_dict().items()}
    dense = fully_convolutional(alexnet)
    assert isinstance(dense, FullyConvolutionalNet) and dense.training
    assert isinstance(alexnet.avgpool, nn.AdaptiveAvgPool2d)  # the model keeps its own layers
    for key, value in alexnet.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unsupported_models_and_small_inputs_are_refused():
    with pytest.raises(UserError, match="cannot convert a Conv2d"):
        fully_convolutional(nn.Conv2d(3, 3, 1))
    odd = nn.Module()
    odd.features = nn.Sequential(nn.Conv2d(3, 4, 3))
    odd.classifier = nn.Sequential(nn.Linear(16, 8), nn.Softmax(dim=1))
    with pytest.raises(UserError, match=r"classifier.1 is a Softmax"):
        fully_convolutional(odd)
    dense = fully_convolutional(_classifier("alexnet")).eval()
    with pytest.raises(ValueError, match="smaller than the"):
        dense(torch.randn(1, 3, 100, 100))
