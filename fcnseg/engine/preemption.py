"""Stopping on request: SIGTERM, SIGINT or SIGUSR2 ends training after a complete, saved step.

A scheduler preempting a job (SLURM, Kubernetes) or a user pressing Ctrl-C sends SIGTERM or
SIGINT; SLURM warns of a job's time limit with SIGUSR2 (``--signal=USR2@90``, what submitit
asks for). ``StopSignals`` turns the signal into a flag that the training loop reads after each
step; every process agrees on it in the step's all-reduce, so they all stop after the same
step, write ``last.pt`` and raise ``TrainingInterrupted``, whose message is the command that
resumes the run. A handler that was installed for the signal before training (submitit's, which
requeues the job) is then called, with ``last.pt`` written. Loader workers ignore these signals
(``shielded``): a worker killed by the scheduler's signal would break the batch that the last
step needs.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from fcnseg.utils.distributed import DistInfo

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT) + (
    (signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ()  # not on Windows
)


class TrainingInterrupted(Exception):
    """A stop signal ended training after a complete step, which ``checkpoint`` holds.

    The message says how to resume.
    """

    def __init__(self, message: str, *, signum: int, iteration: int, checkpoint: Path) -> None:
        super().__init__(message)
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint

    @classmethod
    def after(
        cls, received: int | None, *, iteration: int, max_iters: int, checkpoint: Path, resume: str
    ) -> TrainingInterrupted:
        """The stop after ``iteration``, caused by signal ``received`` (``None``: another
        process's), whose message says how to ``resume``."""
        cause = signal.Signals(received).name if received else "a stop signal to another process"
        message = (
            f"training stopped by {cause} after iteration {iteration}/{max_iters}; {checkpoint} "
            f"holds it. Resume with:\n  {resume}"
        )
        signum = int(received or signal.SIGTERM)
        return cls(message, signum=signum, iteration=iteration, checkpoint=checkpoint)

    @property
    def exit_code(self) -> int:
        """The shell's status for death by this signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum


class StopSignals:
    """While active, SIGTERM, SIGINT and SIGUSR2 ask the training loop to stop after the
    current step.

    torchrun forwards the signal it receives to every worker, which may have had it already from
    the terminal (Ctrl-C) or the scheduler: a repeat within ``repeat_window`` seconds is that same
    request. A later repeat has the signal's usual effect, so a second Ctrl-C still aborts at once
    (``last.pt`` stays readable: checkpoints are written atomically).

    Leaving the block with ``TrainingInterrupted`` (the stop was honoured, ``last.pt`` written)
    hands the signal on to the Python handler it had before (submitit's requeue on SIGUSR2),
    which may end the process.
    """

    def __init__(
        self, log: logging.Logger, dist: DistInfo | None = None, repeat_window: float = 5.0
    ) -> None:
        self.log, self.repeat_window = log, repeat_window
        enabled = dist is not None and dist.enabled
        self.who = f"process {dist.rank} of {dist.world_size}" if enabled else "this process"
        self.received: int | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type=None, exc=None, traceback=None) -> None:
        previous = dict(self._previous)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        handler = previous.get(self.received)
        if isinstance(exc, TrainingInterrupted) and _hands_on(handler):
            self.log.info(
                "handing %s on to the handler installed before training (%s)",
                signal.Signals(self.received).name, getattr(handler, "__qualname__", handler),
            )  # fmt: skip
            handler(self.received, None)

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received, self._at = signum, time.monotonic()
            self.log.warning(
                "%s received by %s: finishing the current step, then saving last.pt",
                signal.Signals(signum).name, self.who,
            )  # fmt: skip
        elif time.monotonic() - self._at > self.repeat_window:
            self.__exit__()
            signal.raise_signal(signum)


def _hands_on(handler: Any) -> bool:
    """Whether ``handler`` is someone's Python handler, not Python's or the system's own (the
    default actions, ignoring, Ctrl-C's KeyboardInterrupt)."""
    return callable(handler) and handler is not signal.default_int_handler


class _IgnoreStopSignals:
    """DataLoader worker start-up: workers leave the stop signals to the training process.

    A scheduler signals every process of a job; a loader worker killed by it would make the next
    batch fail instead of letting the step finish and the checkpoint be written. Such workers
    must be stopped explicitly (``close()`` on the loader's iterator, see
    ``fcnseg.data.loader``): the interpreter's exit would wait for them forever.
    """

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


def shielded(loader: DataLoader) -> DataLoader:
    """``loader`` with workers that ignore stop signals."""
    if loader.num_workers > 0 and not isinstance(loader.worker_init_fn, _IgnoreStopSignals):
        loader.worker_init_fn = _IgnoreStopSignals(loader.worker_init_fn)
    return loader
