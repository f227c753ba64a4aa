"""Augmentation keeps labels on their pixels: images whose colours encode their own labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcnseg.data.transforms import build_transforms
from fcnseg.errors import UserError
from fcnseg.utils.normalization import NORMALIZATIONS

IGNORE = 255
# A distinct colour per label value (classes 0-20 and the ignore value); none is black, the
# colour of padding.
VALUES = [*range(21), IGNORE]
COLOURS = {
    v: ((40 + 37 * k) % 256, (200 + 91 * k) % 256, (90 + 53 * k) % 256)
    for k, v in enumerate(VALUES)
}


def encoded_sample(
    seed: int, h: int = 60, w: int = 84, block: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """A label map of ``block``-pixel squares (ignore among them) and an image painting every
    pixel with its label's colour."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice(VALUES, size=(-(-h // block), -(-w // block)))
    label = np.kron(blocks, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)
    image = np.zeros((h, w, 3), np.uint8)
    for v, c in COLOURS.items():
        image[label == v] = c
    return image, label


def decode(image: torch.Tensor) -> np.ndarray:
    """The label value whose colour is nearest each pixel of a ``normalize="none"`` output;
    -1 for black (padding)."""
    pixels = image.permute(1, 2, 0).numpy() * 255
    table = np.array([COLOURS[v] for v in VALUES], np.float32)
    dist = ((pixels[:, :, None, :] - table[None, None]) ** 2).sum(-1)
    values = np.array(VALUES)[dist.argmin(-1)]
    return np.where(pixels.sum(-1) == 0, -1, values)


def interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds one label: bilinear resampling leaves their
    colour untouched. The crop's outer pixels are not: their neighbours were cropped away."""
    m = np.pad(mask.astype(np.int64), 1, constant_values=-2)
    same = np.ones(mask.shape, bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            same &= m[dy : dy + mask.shape[0], dx : dx + mask.shape[1]] == mask
    return same


def misaligned(image: torch.Tensor, mask: torch.Tensor) -> int:
    """Interior pixels whose colour says another label than the mask (padding excluded)."""
    m = mask.numpy()
    decoded = decode(image)
    check = interior(m) & (decoded != -1)
    return int((decoded[check] != m[check]).sum())


def train_transform(**kwargs):
    options = dict(
        normalize="none",
        ignore_index=IGNORE,
        crop_size=(40, 48),
        scale_range=(0.5, 2.0),
        hflip=True,
    )
    return build_transforms(train=True, **{**options, **kwargs})


def test_training_augmentation_keeps_labels_aligned():
    transform = train_transform()
    sizes = set()
    for seed in range(24):
        image, label = encoded_sample(seed)
        transform.reseed(seed)
        out_image, out_mask = transform(image, label)
        assert out_image.shape == (3, 40, 48) and out_mask.shape == (40, 48)
        assert out_mask.dtype == torch.int64
        assert misaligned(out_image, out_mask) == 0
        # Nearest-neighbour masks: only values of the source, padding = ignore on black.
        assert set(out_mask.unique().tolist()) <= set(VALUES)
        padding = decode(out_image) == -1
        assert (out_mask.numpy()[padding] == IGNORE).all()
        sizes.add(int(padding.sum()))
    assert len(sizes) > 1  # the scale (hence the padding) varied


def test_the_alignment_check_catches_a_misaligned_mask():
    """The check above fails when only the image is flipped: it can tell."""
    image, label = encoded_sample(0)
    transform = build_transforms(train=False, normalize="none")
    out_image, out_mask = transform(image, label)
    assert misaligned(out_image, out_mask) == 0
    assert misaligned(out_image.flip(-1), out_mask) > 100


def test_flip_alone_preserves_every_ignore_pixel():
    image, label = encoded_sample(3)
    transform = train_transform(crop_size=None, scale_range=(1.0, 1.0))
    flips = 0
    for seed in range(8):
        transform.reseed(seed)
        _, mask = transform(image, label)
        m = mask.numpy()
        assert np.array_equal(m, label) or np.array_equal(m, label[:, ::-1])
        flips += np.array_equal(m, label[:, ::-1])
        assert (m == IGNORE).sum() == (label == IGNORE).sum()
    assert 0 < flips < 8


def test_colour_jitter_changes_pixels_not_labels():
    image, label = encoded_sample(5)
    plain, jittered = train_transform(), train_transform(color_jitter=0.4)
    changed = 0
    for seed in range(6):
        plain.reseed(seed)
        jittered.reseed(seed)
        (a, ma), (b, mb) = plain(image, label), jittered(image, label)
        assert torch.equal(ma, mb)  # same geometry from the same seed
        changed += int(not torch.allclose(a, b))
    assert changed > 0


def test_reseeding_reproduces_a_sample():
    image, label = encoded_sample(1)
    transform = train_transform(color_jitter=0.2)
    outs = []
    for seed in (7, 7, 8):
        transform.reseed(seed)
        outs.append(transform(image, label))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])


def test_small_images_are_padded_with_ignore():
    image, label = encoded_sample(2, h=12, w=10)
    transform = train_transform(scale_range=(1.0, 1.0), hflip=False)
    out_image, out_mask = transform(image, label)
    assert out_mask.shape == (40, 48)
    assert (out_mask == IGNORE).sum() == 40 * 48 - 12 * 10 + (label == IGNORE).sum()
    assert misaligned(out_image, out_mask) == 0


@pytest.mark.parametrize("normalize", sorted(NORMALIZATIONS))
def test_eval_is_normalisation_only_at_full_resolution(normalize):
    image, label = encoded_sample(4, h=37, w=53)
    out_image, out_mask = build_transforms(train=False, normalize=normalize)(image, label)
    assert out_image.shape == (3, 37, 53)
    np.testing.assert_array_equal(out_mask.numpy(), label)
    n = NORMALIZATIONS[normalize]
    rgb = image.astype(np.float64)
    expected = (rgb - np.array(n.mean) * n.max_pixel_value) / (np.array(n.std) * n.max_pixel_value)
    expected = expected.transpose(2, 0, 1)
    if n.bgr:
        expected = expected[::-1]
    np.testing.assert_allclose(out_image.numpy(), expected, rtol=1e-5, atol=1e-4)


def test_label_values_beyond_a_byte_survive():
    rng = np.random.default_rng(0)
    label = np.kron(rng.integers(0, 300, size=(6, 6)), np.ones((8, 8), np.int64))
    image = np.zeros((48, 48, 3), np.uint8)
    transform = build_transforms(
        train=True, normalize="none", ignore_index=-1, crop_size=64, scale_range=(1.0, 1.0)
    )
    _, mask = transform(image, label)
    values = set(mask.unique().tolist())
    assert values - {-1} == set(np.unique(label).tolist()) and -1 in values


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(scale_range=(2.0, 0.5)), "dataset.scale_range"),
        (dict(scale_range=(0.5,)), "dataset.scale_range"),
        (dict(crop_size=0), "dataset.crop_size=0"),
        (dict(crop_size=[32, 32, 3]), "dataset.crop_size"),
        (dict(color_jitter=2.0), "dataset.color_jitter=2.0"),
        (dict(normalize="bgr"), "dataset.normalize='bgr'"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(UserError, match=message):
        build_transforms(train=True, **kwargs)


def test_size_pairs_are_read_in_one_place():
    """fcnseg.utils.validate.size_pair: crop sizes, windows and kernels, as a side or a pair."""
    from omegaconf import OmegaConf

    from fcnseg.utils.validate import size_pair

    assert size_pair(64, name="dataset.crop_size") == (64, 64)
    assert size_pair([40, 48], name="dataset.crop_size") == (40, 48)
    assert size_pair(OmegaConf.create([40, 48]), name="eval.crop_size") == (40, 48)
    assert size_pair(np.array([3, 5]), name="kernel_size") == (3, 5)
    assert size_pair((0, 2), name="padding", minimum=0) == (0, 2)
    for bad in (0, [32, 32, 3], [32.0, 32], True, "64", [16, -1], None):
        with pytest.raises(UserError, match=r"^dataset.crop_size=.* must be a side or a"):
            size_pair(bad, name="dataset.crop_size")
    with pytest.raises(UserError, match=r"padding=-1 must be a side .*, at least 0"):
        size_pair(-1, name="padding", minimum=0)
