"""Side-by-side comparison of several runs' metrics (``metrics.json`` files)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fcnseg.errors import UserError

SUMMARY = (
    ("miou", "mIoU"),
    ("pixel_acc", "pixel acc"),
    ("mean_acc", "mean acc"),
    ("fwiou", "fwIoU"),
)


def load_metrics(path: str | Path) -> dict[str, Any]:
    """A run's metrics: ``path`` is a metrics JSON file or a run directory holding
    ``metrics.json``."""
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        where = (
            f"run directory {path} has no metrics.json"
            if path.is_dir()
            else f"{path} does not exist"
        )
        raise UserError(where)
    try:
        metrics = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{file} is not a readable JSON file ({err})") from err
    missing = [k for k in ("class_names", "iou", *(k for k, _ in SUMMARY)) if k not in metrics]
    if missing:
        raise UserError(f"{file} is not a metrics file: it lacks {', '.join(missing)}")
    return metrics


def run_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short column names: a run directory's name (or a JSON file's, or its folder's for
    ``metrics.json``); the paths as given when those names collide."""
    names = []
    for p in map(Path, paths):
        p = p.parent if p.name == "metrics.json" else p
        names.append(p.stem if p.suffix == ".json" else p.name or str(p))
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def format_comparison(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Per-class IoU and the four summary metrics (percent), one column per run.

    Classes are matched by name (a class a run does not have shows ``-``). With two runs a
    last column gives the difference (second minus first); with more, the best run's name.
    """
    if not runs:
        raise ValueError("nothing to compare")
    labels = [label for label, _ in runs]
    classes: list[str] = []
    for _, m in runs:
        classes += [c for c in m["class_names"] if c not in classes]
    rows: list[tuple[str, list[float | None]]] = []
    for c in classes:
        values = []
        for _, m in runs:
            ious = dict(zip(m["class_names"], m["iou"]))
            values.append(ious.get(c))
        rows.append((c, values))
    summary = [(label, [m[key] for _, m in runs]) for key, label in SUMMARY]

    col = max(8, *(len(label) for label in labels))
    first = max(12, *(len(c) for c in classes))
    extra = "delta" if len(runs) == 2 else ("best" if len(runs) > 2 else "")
    header = f"{'class':<{first}} " + " ".join(f"{label:>{col}}" for label in labels)
    header += f" {extra:>{col}}" if extra else ""
    rule = "-" * len(header)

    def line(name: str, values: list[float | None]) -> str:
        cells = " ".join(f"{'-':>{col}}" if v is None else f"{100 * v:>{col}.2f}" for v in values)
        known = [(v, i) for i, v in enumerate(values) if v is not None]
        tail = ""
        if len(runs) == 2:
            a, b = values
            tail = f" {'-':>{col}}" if a is None or b is None else f" {100 * (b - a):>+{col}.2f}"
        elif len(runs) > 2:
            top = max((v for v, _ in known), default=None)
            best = [labels[i] for v, i in known if v == top]
            tail = f" {best[0] if len(best) == 1 else ('tie' if best else '-'):>{col}}"
        return f"{name:<{first}} {cells}{tail}"

    lines = [header, rule, *(line(n, v) for n, v in rows), rule, *(line(n, v) for n, v in summary)]
    lines.append(
        f"{'images':<{first}} " + " ".join(f"{m.get('num_images', '-'):>{col}}" for _, m in runs)
    )
    return "\n".join(lines)


def sweep_runs(folder: str | Path) -> list[Path]:
    """The run directories (holding ``metrics.json``) anywhere under a sweep's ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"sweep folder {folder} does not exist")
    runs = sorted(p.parent for p in folder.rglob("metrics.json"))
    if not runs:
        raise UserError(f"sweep folder {folder} holds no run with a metrics.json yet")
    return runs


def run_overrides(run: Path) -> str:
    """The command-line overrides a run was started with (``.hydra/overrides.yaml``)."""
    file = run / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return "-"
    items = [line[2:].strip() for line in file.read_text().splitlines() if line.startswith("- ")]
    return " ".join(items) or "-"


def format_sweep(runs: Sequence[tuple[str, str, dict[str, Any]]]) -> str:
    """One line per run (name, summary metrics in percent, overrides), best mIoU first."""
    ranked = sorted(runs, key=lambda run: run[2]["miou"], reverse=True)
    name = max(3, *(len(label) for label, _, _ in ranked))
    header = f"{'run':<{name}} " + " ".join(f"{label:>9}" for _, label in SUMMARY) + "  overrides"
    lines = [header, "-" * len(header)]
    for label, overrides, m in ranked:
        cells = " ".join(f"{100 * m[key]:>9.2f}" for key, _ in SUMMARY)
        lines.append(f"{label:<{name}} {cells}  {overrides}")
    return "\n".join(lines)
