"""Console + file logging on the main process, and progress bars that stay out of logs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

LOGGER_NAME = "fcnseg"


def setup_logging(log_file: Path | None = None, *, main_process: bool = True) -> logging.Logger:
    """The ``fcnseg`` logger: INFO to stderr and ``log_file`` on the main process only."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file is not None and main_process:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar with ETA, shown only on an interactive terminal (never in log files)."""
    return tqdm(
        iterable,
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
        leave=False,
        **kwargs,
    )
