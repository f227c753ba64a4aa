"""The built-in synthetic dataset: deterministic, varied, and not solvable from colour alone."""

import numpy as np
import pytest

from fcnseg.data import SyntheticShapes
from fcnseg.data.synthetic import CLASS_NAMES


def test_samples_are_a_pure_function_of_seed_split_and_index():
    a, b = (
        SyntheticShapes(split="train", num_samples=5),
        SyntheticShapes(split="train", num_samples=5),
    )
    for i in range(5):
        (ia, ma), (ib, mb) = a.load(i), b.load(i)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    other_split = SyntheticShapes(split="val", num_samples=5).load(0)[0]
    other_seed = SyntheticShapes(split="train", num_samples=5, seed=1).load(0)[0]
    first = a.load(0)[0]
    assert other_split.shape != first.shape or not np.array_equal(other_split, first)
    assert other_seed.shape != first.shape or not np.array_equal(other_seed, first)


def test_sizes_vary_within_the_range_and_every_class_occurs():
    ds = SyntheticShapes(split="train", num_samples=60, min_size=48, max_size=80)
    shapes = {ds.load(i)[0].shape[:2] for i in range(len(ds))}
    assert len(shapes) > 30
    assert all(48 <= s <= 80 for hw in shapes for s in hw)
    labels = np.concatenate([ds.load(i)[1].ravel() for i in range(len(ds))])
    assert set(np.unique(labels)) == set(range(len(CLASS_NAMES)))


def test_colour_alone_does_not_tell_the_class():
    """The best colour -> class lookup table fitted on training images labels the object pixels
    of the validation images hardly better than chance (1/4): classes share their colours."""
    bins = 6  # 6x6x6 colour cells

    def colour_class_counts(split, n):
        ds, counts = SyntheticShapes(split=split, num_samples=n), np.zeros((bins**3, 5), np.int64)
        for i in range(n):
            image, mask = ds.load(i)
            cell = (image.astype(np.int64) * bins // 256) @ np.array([bins * bins, bins, 1])
            np.add.at(counts, (cell.ravel(), mask.ravel()), 1)
        return counts[:, 1:]  # object pixels only: the background is the easy majority

    lookup = colour_class_counts("train", 300).argmax(1)
    val = colour_class_counts("val", 100)
    accuracy = val[np.arange(len(val)), lookup].sum() / val.sum()
    assert accuracy < 0.4


def test_index_out_of_range_raises_index_error():
    ds = SyntheticShapes(split="val", num_samples=3)
    assert ds[-1][1].shape == ds[2][1].shape
    with pytest.raises(IndexError, match="sample 3 is out of range for 3 samples"):
        ds[3]
    assert list(range(3)) == [i for i, _ in enumerate(ds)]
