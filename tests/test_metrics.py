"""SegMetrics against confusion matrices and metrics worked out by hand."""

import math

import pytest
import torch

from fcnseg.metrics import SegMetrics, format_table


def test_confusion_and_metrics_by_hand():
    # 3 classes, one 2x4 image; 255 is ignored.
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 0]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
    m = SegMetrics(3, ignore_index=255, class_names=["a", "b", "c"])
    m.update(pred, target)
    r = m.compute()
    # Rows = ground truth: class 0 -> predicted 0,1,0 ; class 1 -> 1,1 ; class 2 -> 2,0.
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert r["num_pixels"] == 7 and r["num_images"] == 1
    assert r["pixel_acc"] == pytest.approx(5 / 7)
    # IoU: class 0: 2 / (3 + 3 - 2) = 1/2; class 1: 2 / (2 + 3 - 2) = 2/3;
    # class 2: 1 / (2 + 1 - 1) = 1/2
    assert r["iou"] == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert r["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert r["mean_acc"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert r["fwiou"] == pytest.approx((3 * 1 / 2 + 2 * 2 / 3 + 2 * 1 / 2) / 7)


def test_logits_equal_labels_and_batches_accumulate():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 6, 7, generator=g)
    target = torch.randint(0, 5, (4, 6, 7), generator=g)
    a, b = SegMetrics(5), SegMetrics(5)
    a.update(logits, target)
    b.update(logits[:2].argmax(1), target[:2])
    b.update(logits[2:].argmax(1), target[2:])
    assert a.compute() == b.compute()
    # Independent count of the confusion matrix.
    pred = logits.argmax(1)
    expected = [[int(((target == i) & (pred == j)).sum()) for j in range(5)] for i in range(5)]
    assert a.compute()["confusion_matrix"] == expected


def test_absent_class_left_out_of_means():
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 0, 1, 0]]])
    m = SegMetrics(3)
    m.update(pred, target)
    r = m.compute()
    assert r["iou"][2] is None and r["acc"][2] is None
    assert r["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert r["mean_acc"] == pytest.approx((1 + 1 / 2) / 2)


def test_class_only_predicted_counts_as_zero_iou():
    # Class 2 never in ground truth but predicted: IoU 0, included in mIoU, not in mean acc.
    target = torch.tensor([[[0, 1]]])
    pred = torch.tensor([[[0, 2]]])
    m = SegMetrics(3)
    m.update(pred, target)
    r = m.compute()
    assert r["iou"] == [1.0, 0.0, 0.0]
    assert r["miou"] == pytest.approx(1 / 3)
    assert r["acc"][2] is None and r["mean_acc"] == pytest.approx(1 / 2)


def test_all_ignored_and_reset():
    m = SegMetrics(2)
    m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255))
    r = m.compute()
    assert r["num_pixels"] == 0 and r["miou"] == 0.0 and r["iou"] == [None, None]
    m.reset()
    assert m.compute()["num_images"] == 0


def test_out_of_range_label_is_named():
    m = SegMetrics(3)
    with pytest.raises(ValueError, match="label value 7"):
        m.update(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[0, 7]]]))


def test_table_lists_every_class_and_summary():
    m = SegMetrics(2, class_names=["road", "sky"])
    m.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]))
    table = format_table(m.compute())
    assert "road" in table and "sky" in table and "mIoU" in table and "100.00" in table
    assert not math.isnan(m.compute()["fwiou"])
