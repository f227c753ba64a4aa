"""The one table formatter: plain text and Markdown, and the metrics table printed by train.py
and evaluate.py and stored by the loggers, each against a table written out by hand."""

import pytest
import torch

from fcnseg.metrics import SegMetrics, format_table
from fcnseg.utils import tables


def test_plain_text_columns_rules_and_short_rows():
    text = tables.format_table(
        ["name", "n"], [["a", "1"], None, ["longer", "12345"], ["x"]], align="<>"
    )
    assert text.splitlines() == [
        "name       n",
        "-------------",  # each column and the space after it: 6 + 1 + 5 + 1
        "a          1",
        "-------------",
        "longer 12345",
        "x",  # no trailing spaces
    ]


def test_least_widths_widen_the_first_columns():
    text = tables.format_table(["a", "b", "c"], [["1", "2", "3"]], align="<>>", min_widths=[3, 2])
    assert text.splitlines() == ["a    b c", "---------", "1    2 3"]


def test_markdown_rows_under_an_alignment_row():
    text = tables.format_table(["variant", "ms"], [["fp32", "1.5"]], align="<>", markdown=True)
    assert text.splitlines() == ["| variant | ms |", "|---|---:|", "| fp32 | 1.5 |"]


@pytest.mark.parametrize(
    "header, rows, align, markdown",
    [
        (["a", "b"], [], "<", False),  # one alignment short
        (["a", "b"], [], "<^", False),  # not left or right
        (["a"], [["1", "2"]], "<", False),  # a row wider than the header
        (["a"], [None], "<", True),  # a rule in Markdown
    ],
)
def test_a_table_that_cannot_be_drawn_is_refused(header, rows, align, markdown):
    with pytest.raises(ValueError):
        tables.format_table(header, rows, align=align, markdown=markdown)


def test_the_metrics_table():
    # road: 3 of 4 pixels right, sky predicted once wrongly; sky: 1 of 1 right; cat: absent.
    m = SegMetrics(3, class_names=["road", "sky", "cat"])
    m.update(torch.tensor([[[0, 0, 0, 1, 1]]]), torch.tensor([[[0, 0, 0, 1, 0]]]))
    m.update(torch.tensor([[[0]]]), torch.tensor([[[255]]]))  # ignored: an image, no pixel
    # IoU road 3/4, sky 1/2; acc road 3/4, sky 1; pixel acc 4/5; fwIoU (4*3/4 + 1/2) / 5.
    assert format_table(m.compute()).splitlines() == [
        "class           IoU    Acc",
        "---------------------------",
        "road          75.00  75.00",
        "sky           50.00 100.00",
        "cat               -      -",
        "---------------------------",
        "mIoU          62.50",
        "pixel acc     80.00",
        "mean acc      87.50",
        "fwIoU         70.00",
        "images            2",
    ]
