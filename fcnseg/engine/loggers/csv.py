"""``RUN/metrics.csv``: every logged scalar, one row per iteration, readable while it grows."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fcnseg.engine.loggers.base import ExperimentLogger
from fcnseg.utils.atomic import atomic_path


class CSVLogger(ExperimentLogger):
    """``run_dir/metrics.csv``: one row per logged iteration, one column per scalar.

    The first column is ``iteration``; the others follow in the order they were first logged
    (``train/loss``, ``train/lr``, ``val/miou``, ...). A scalar first logged late adds a column
    and the file is rewritten with it, earlier rows left blank there, so that every row has
    the header's fields and ``pandas.read_csv`` reads the file as is, also while the run
    writes it.

    Args:
        run_dir: the run's folder.
        resume_from: the iteration a resumed run continues from: the file's rows after it,
            written by the interrupted run past its checkpoint, are dropped.
    """

    def __init__(self, run_dir: str | Path, *, resume_from: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.columns: list[str] = ["iteration"]
        self.rows: list[dict[str, Any]] = []
        if resume_from is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or self.columns)
                for row in reader:
                    step = row.get("iteration") or ""
                    if step.isdigit() and int(step) <= resume_from:
                        self.rows.append({**row, "iteration": int(step)})
        self._rewrite()

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        new = [key for key in values if key not in self.columns]
        self.columns += new
        if self.rows and self.rows[-1]["iteration"] == step:  # e.g. val/* after train/*
            self.rows[-1].update(values)
            self._rewrite()
            return
        self.rows.append({"iteration": step, **values})
        if new:
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                self._writer(f).writerow(self.rows[-1])

    def _writer(self, f) -> csv.DictWriter:
        return csv.DictWriter(f, self.columns, restval="", extrasaction="ignore")

    def _rewrite(self) -> None:
        # Atomic: a reader, or a run killed mid-write, never sees half a file.
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = self._writer(f)
            writer.writeheader()
            writer.writerows(self.rows)
