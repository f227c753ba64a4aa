"""The one table formatter: rows of cells as aligned plain text or as a Markdown table.

The metrics table (``fcnseg.metrics.format_table``: what ``train.py`` and ``evaluate.py`` print
and the loggers store) and the benchmarks' reports (``fcnseg.bench.common.format_table``) are
both drawn here; they choose only their cells.
"""

from __future__ import annotations

from collections.abc import Sequence

#: A row of cells, or ``None`` for a rule (plain text only).
Row = Sequence[str] | None


def format_table(
    header: Sequence[str],
    rows: Sequence[Row],
    *,
    align: str,
    min_widths: Sequence[int] = (),
    markdown: bool = False,
) -> str:
    """``header`` and ``rows`` as a table, one line per row.

    Args:
        header: the columns' titles.
        rows: the cells of each row, already formatted; a row may have fewer cells than the
            header (a summary line under a rule). ``None`` draws a rule.
        align: one character per column, ``<`` (left) or ``>`` (right).
        min_widths: the least width of the first columns (plain text), so that tables of
            different rows line up the same.
        markdown: a Markdown table (``| a | b |`` under an alignment row; cells unpadded)
            instead of plain text (each column as wide as its widest cell, followed by a
            space; a rule spans the columns with those spaces; no line ends in a space). The
            header is followed by a rule in plain text.

    Raises:
        ValueError: ``align`` does not give one of ``<`` and ``>`` per column, or a row has more
            cells than the header, or a Markdown table is given a rule.
    """
    if len(align) != len(header) or set(align) - {"<", ">"}:
        raise ValueError(f"align={align!r}: one of '<' and '>' per column of {list(header)}")
    if any(row is not None and len(row) > len(header) for row in rows):
        raise ValueError(f"a row has more cells than the header {list(header)}")
    if markdown:
        if any(row is None for row in rows):
            raise ValueError("a Markdown table has no rules")
        rule = "|" + "|".join("---" if a == "<" else "---:" for a in align) + "|"
        return "\n".join([_markdown(header), rule, *(_markdown(row) for row in rows)])
    least = [*min_widths, *[0] * len(header)]
    widths = [
        max(len(title), least[i], *(len(row[i]) for row in rows if row and i < len(row)))
        for i, title in enumerate(header)
    ]
    rule = "-" * sum(w + 1 for w in widths)
    lines = [rule if row is None else _plain(row, widths, align) for row in [header, None, *rows]]
    return "\n".join(lines)


def _plain(cells: Sequence[str], widths: Sequence[int], align: str) -> str:
    return " ".join(f"{c:{a}{w}}" for c, w, a in zip(cells, widths, align)).rstrip()


def _markdown(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
