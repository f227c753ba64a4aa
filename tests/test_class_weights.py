"""Median-frequency class weights: the formula by hand, the cache, and loss.class_weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fcnseg.data import SegmentationDataset, SyntheticShapes
from fcnseg.data.class_weights import (
    cached_median_frequency,
    label_counts,
    median_frequency_weights,
    resolve_class_weights,
)
from fcnseg.errors import UserError

IGNORE = 255


class Masks(SegmentationDataset):
    """Hand-written label maps (images are black); counts how often labels are read."""

    def __init__(self, masks, names=None, **kwargs):
        super().__init__(num_classes=4, ignore_index=IGNORE, **kwargs)
        self.masks = [np.array(m, np.uint8) for m in masks]
        self.names = names or [f"mask{i}.png" for i in range(len(masks))]
        self.loads = 0

    def __len__(self):
        return len(self.masks)

    def describe(self, index):
        return self.names[index]

    def load(self, index):
        self.loads += 1
        mask = self.masks[index]
        return np.zeros((*mask.shape, 3), np.uint8), mask


MASKS = [
    [[0, 0, 1], [0, 1, IGNORE]],  # 5 labelled pixels: class 0 x3, class 1 x2
    [[0, 2], [2, 2]],  # 4 labelled: class 0 x1, class 2 x3
    [[1, 1, 1, IGNORE]],  # 3 labelled: class 1 x3
]
# By hand. Class pixels: c0 = 3 + 1 = 4, c1 = 2 + 3 = 5, c2 = 3, c3 = 0 (never occurs).
# Labelled pixels of the images containing the class: c0 = 5 + 4 = 9, c1 = 5 + 3 = 8, c2 = 4.
# freq = 4/9, 5/8, 3/4; median = 5/8; weights = (5/8)/(4/9) = 45/32, 1, (5/8)/(3/4) = 5/6, and
# 1 for the absent class.
CLASS_PIXELS, IMAGE_PIXELS = [4, 5, 3, 0], [9, 8, 4, 0]
WEIGHTS = [45 / 32, 1.0, 5 / 6, 1.0]


def test_counts_and_weights_match_a_hand_computation():
    class_pixels, image_pixels = label_counts(Masks(MASKS), num_classes=4, ignore_index=IGNORE)
    assert class_pixels.tolist() == CLASS_PIXELS
    assert image_pixels.tolist() == IMAGE_PIXELS
    assert median_frequency_weights(class_pixels, image_pixels) == pytest.approx(WEIGHTS, rel=1e-12)


def test_even_number_of_classes_takes_the_mean_of_the_middle_frequencies():
    # freq = 1/2, 1/4, 1/8, 1/1 -> median = (1/4 + 1/2) / 2 = 3/8
    weights = median_frequency_weights([1, 1, 1, 4], [2, 4, 8, 4])
    assert weights == pytest.approx([3 / 4, 3 / 2, 3, 3 / 8])


def test_synthetic_split_matches_a_direct_computation(tmp_path):
    data = SyntheticShapes(split="train", num_samples=6, min_size=40, max_size=56, seed=1)
    weights = cached_median_frequency(
        data, num_classes=5, ignore_index=IGNORE, identity={"seed": 1}, cache_dir=tmp_path
    )
    masks = [data.load(i)[1] for i in range(len(data))]
    assert set(np.unique(np.concatenate([m.ravel() for m in masks]))) == set(range(5))
    freq = []
    for c in range(5):
        with_c = [m for m in masks if (m == c).any()]
        freq.append(sum((m == c).sum() for m in with_c) / sum(m.size for m in with_c))
    assert weights == pytest.approx([float(np.median(freq)) / f for f in freq], rel=1e-12)


def test_weights_are_cached_and_keyed_by_the_dataset(tmp_path):
    data = Masks(MASKS)
    first = cached_median_frequency(
        data, num_classes=4, ignore_index=IGNORE, identity={"root": "/a"}, cache_dir=tmp_path
    )
    assert data.loads == 3
    files = list(tmp_path.glob("median_frequency-*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert record["class_pixels"] == CLASS_PIXELS and record["image_pixels"] == IMAGE_PIXELS
    again = cached_median_frequency(
        data, num_classes=4, ignore_index=IGNORE, identity={"root": "/a"}, cache_dir=tmp_path
    )
    assert again == first and data.loads == 3  # read from the cache, not recounted
    # Another configuration, another sample list or another ignore index is another key.
    cached_median_frequency(
        data, num_classes=4, ignore_index=IGNORE, identity={"root": "/b"}, cache_dir=tmp_path
    )
    renamed = Masks(MASKS, names=["a.png", "b.png", "c.png"])
    cached_median_frequency(
        renamed, num_classes=4, ignore_index=IGNORE, identity={"root": "/a"}, cache_dir=tmp_path
    )
    assert data.loads == 6 and renamed.loads == 3
    assert len(list(tmp_path.glob("median_frequency-*.json"))) == 3


def test_an_unreadable_cache_is_recounted(tmp_path):
    data = Masks(MASKS)
    kwargs = dict(num_classes=4, ignore_index=IGNORE, identity={}, cache_dir=tmp_path)
    cached_median_frequency(data, **kwargs)
    (path,) = tmp_path.glob("median_frequency-*.json")
    path.write_text("{not json")
    assert cached_median_frequency(data, **kwargs) == pytest.approx(WEIGHTS)
    assert data.loads == 6
    assert json.loads(path.read_text())["weights"] == pytest.approx(WEIGHTS)


def test_a_cache_that_cannot_be_written_still_gives_the_weights(tmp_path, caplog):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    data = Masks(MASKS)
    kwargs = dict(num_classes=4, ignore_index=IGNORE, identity={}, cache_dir=tmp_path / "cache")
    with caplog.at_level("WARNING"):
        assert cached_median_frequency(data, **kwargs) == pytest.approx(WEIGHTS)
    assert f"{tmp_path / 'cache'} is a file, not a folder" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_a_bad_label_names_its_file(tmp_path):
    data = Masks([[[0, 1]], [[0, 7]]], names=["good.png", "bad.png"])
    with pytest.raises(UserError, match="bad.png: label value 7"):
        cached_median_frequency(
            data, num_classes=4, ignore_index=IGNORE, identity={}, cache_dir=tmp_path
        )


def test_labels_with_nothing_labelled_are_a_user_error(tmp_path):
    data = Masks([[[IGNORE, IGNORE]]])
    with pytest.raises(UserError, match="no labelled pixel"):
        cached_median_frequency(
            data, num_classes=4, ignore_index=IGNORE, identity={}, cache_dir=tmp_path
        )


def test_resolve_class_weights_accepts_the_three_forms(tmp_path):
    data = Masks(MASKS)
    kwargs = dict(dataset=data, num_classes=4, ignore_index=IGNORE, identity={}, cache_dir=tmp_path)
    assert resolve_class_weights(None, **kwargs) is None
    assert resolve_class_weights([1, 2, 0.5, 0], **kwargs) == [1.0, 2.0, 0.5, 0.0]
    assert resolve_class_weights("median_frequency", **kwargs) == pytest.approx(WEIGHTS)


def test_class_weight_power_raises_each_weight_to_it(tmp_path):
    kwargs = dict(dataset=Masks(MASKS), num_classes=4, ignore_index=IGNORE, identity={},
                  cache_dir=tmp_path)  # fmt: skip
    roots = resolve_class_weights("median_frequency", power=0.5, **kwargs)
    assert roots == pytest.approx([w**0.5 for w in WEIGHTS], rel=1e-12)
    assert resolve_class_weights([4, 1, 0.25, 0], power=0.5, **kwargs) == [2.0, 1.0, 0.5, 0.0]
    assert resolve_class_weights([4, 1, 0.25, 2], power=0, **kwargs) == [1.0, 1.0, 1.0, 1.0]
    assert resolve_class_weights(None, power=0.5, **kwargs) is None
    for power, message in [
        (-1, r"loss\.class_weight_power=-1\.0 must lie in \[0, 4\]"),
        ("x", r"loss\.class_weight_power='x' is not a number"),
    ]:
        with pytest.raises(UserError, match=message):
            resolve_class_weights("median_frequency", power=power, **kwargs)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("inverse", "loss.class_weights='inverse' is not null, median_frequency"),
        ([1, 2], "has 2 weights but dataset.num_classes is 4"),
        ([1, 2, -1, 1], "must be finite and non-negative"),
        ([1, 2, float("nan"), 1], "must be finite and non-negative"),
        ([1, "a", 1, 1], "not a number"),
        (3, "is not null, median_frequency or a list"),
    ],
)
def test_resolve_class_weights_rejects_bad_values_in_one_sentence(tmp_path, spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        resolve_class_weights(
            spec,
            dataset=Masks(MASKS),
            num_classes=4,
            ignore_index=IGNORE,
            identity={},
            cache_dir=tmp_path,
        )


def independent_weights(masks, num_classes):
    """Median-frequency weights counted here, class by class, from the label arrays."""
    freq = {}
    for c in range(num_classes):
        with_c = [m for m in masks if (m == c).any()]
        if with_c:
            labelled = sum(int((m != IGNORE).sum()) for m in with_c)
            freq[c] = sum(int((m == c).sum()) for m in with_c) / labelled
    median = float(np.median(list(freq.values())))
    return [median / freq[c] if c in freq else 1.0 for c in range(num_classes)]


def test_a_label_file_edited_in_place_is_counted_again(tmp_path):
    """The cache once reused the old weights after a label changed under the same name."""
    import os

    import fixtures as fx

    from fcnseg.data import VOCSegmentation

    root = fx.write_voc(tmp_path / "voc", val=())
    labels = {i: fx.sample_arrays(f"voc/{i}")[1] for i in fx.VOC_TRAIN}
    kwargs = dict(num_classes=21, ignore_index=IGNORE, identity={"root": "voc"}, cache_dir=tmp_path)
    first = cached_median_frequency(VOCSegmentation(root=root, split="train"), **kwargs)
    assert first == pytest.approx(independent_weights(labels.values(), 21), rel=1e-12)
    again = cached_median_frequency(VOCSegmentation(root=root, split="train"), **kwargs)
    assert again == first and len(list(tmp_path.glob("median_frequency-*.json"))) == 1

    # The same name, new content: a large region of class 20 painted over the first label.
    edited = labels[fx.VOC_TRAIN[0]].copy()
    edited[2:-2, 2:-2] = 20
    labels[fx.VOC_TRAIN[0]] = edited
    path = root / "VOCdevkit/VOC2012/SegmentationClass" / f"{fx.VOC_TRAIN[0]}.png"
    st = path.stat()
    fx.save_palette_png(edited, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later edit, surely
    expected = independent_weights(labels.values(), 21)
    assert expected != pytest.approx(first)  # the edit matters to the weights
    recounted = cached_median_frequency(VOCSegmentation(root=root, split="train"), **kwargs)
    assert recounted == pytest.approx(expected, rel=1e-12)
    assert len(list(tmp_path.glob("median_frequency-*.json"))) == 2
