"""Console + file logging on the main process, and progress bars that stay out of logs."""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

LOGGER_NAME = "fcnseg"
FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"


class _Held(logging.Handler):
    """Keeps the records logged before the log file is known, each as it read when logged."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        # The message is rendered now: its arguments may change before the file is known.
        held = copy.copy(record)
        held.msg, held.args = record.getMessage(), None
        if record.exc_info:
            held.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            held.exc_info = None
        self.records.append(held)


def setup_logging(
    log_file: Path | None = None, *, main_process: bool = True, hold: bool = False
) -> logging.Logger:
    """The ``fcnseg`` logger: INFO to stderr and ``log_file`` on the main process only.

    Args:
        log_file: the file that also receives every line, on the main process.
        main_process: whether this process is the main one (rank 0); the others log warnings
            and errors to stderr alone.
        hold: keep what is logged from now on until a later call names ``log_file``, which
            writes it there first. A training run logs before its run directory is accepted
            (which computes, e.g., its class weights), and may write nothing there until then;
            held, those lines reach stderr at once and ``train.log`` once the directory is
            accepted, so the file holds every line from the first. A later call without
            ``log_file``, or on another process, drops them.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    logger.propagate = False  # fcnseg's lines in fcnseg's format, never the root logger's
    held: list[logging.LogRecord] = []
    for h in list(logger.handlers):
        if isinstance(h, _Held):
            held = h.records
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter(FORMAT, DATE_FORMAT)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file is not None and main_process:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        for record in held:  # they were printed already
            handler.handle(record)
        logger.addHandler(handler)
    if hold:
        logger.addHandler(_Held())
    return logger


def launched_as_main() -> bool:
    """Whether the launcher started this process as rank 0 (torchrun's ``RANK``; alone: yes),
    known before the process group forms."""
    return os.environ.get("RANK", "0") == "0"


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
