"""A run directory belongs to one run.

``claim_run_dir`` is the first thing a training run does with its directory, before writing
anything into it: it refuses a directory that holds another run's checkpoints unless the run
continues it (``resume``) or starts over on purpose (``overwrite``), and it takes the
directory's lock, which a second run started in the same directory meets and refuses with the
holder's identity. The lock is released on every way out of the process; a lock whose process
is gone (killed, machine rebooted, or an earlier run of a requeued SLURM job on another node) is
recognised as stale and taken over.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fcnseg.errors import UserError

LOCK_NAME = ".lock"
RUN_FILES = ("checkpoints/last.pt", "checkpoints/best.pt")


class RunLock:
    """``run_dir/.lock``, held by this process for the run's lifetime.

    It records the holder (host, process id, start time, command); ``release`` removes it if
    it is still this process's own.
    """

    def __init__(self, path: Path, owner: dict) -> None:
        self.path, self.owner = path, owner

    def release(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def claim_run_dir(run_dir: Path, *, resume: bool | str, overwrite: bool = False) -> RunLock:
    """Accepts ``run_dir`` for a new or continued run and locks it.

    Args:
        run_dir: the run's folder (created when missing).
        resume: ``trainer.resume``; ``True`` or ``"auto"`` continue the run the folder holds,
            a checkpoint path starts a new run from another one's state.
        overwrite: ``trainer.overwrite``: start a new run over the run the folder holds.

    Raises:
        UserError: the folder cannot be written, holds a finished or interrupted run that this
            run would replace, or is locked by a run that is still alive.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create the run directory {run_dir} ({err.strerror}); choose another "
            f"with hydra.run.dir=DIR"
        ) from err
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(
            f"the run directory {run_dir} is not writable; choose another with hydra.run.dir=DIR"
        )
    lock = _take_lock(run_dir)
    try:
        held = [name for name in RUN_FILES if (run_dir / name).is_file()]
        continues = resume is True or resume == "auto"
        if held and not continues and not overwrite:
            raise UserError(
                f"{run_dir} already holds a run ({', '.join(held)}), which a new run would "
                f"replace; continue it with trainer.resume=true, start over with "
                f"trainer.overwrite=true, or choose another hydra.run.dir"
            )
    except BaseException:
        lock.release()
        raise
    return lock


def _take_lock(run_dir: Path) -> RunLock:
    path = run_dir / LOCK_NAME
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    if os.environ.get("SLURM_JOB_ID"):  # a requeued job knows its earlier runs by these
        owner["slurm_job"] = os.environ["SLURM_JOB_ID"]
        owner["slurm_restart"] = _restart_count()
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder is not None and not _is_stale(holder):
                raise UserError(
                    f"{run_dir} is in use by another run (process {holder.get('pid')} on "
                    f"{holder.get('host')}, started {holder.get('started')}: "
                    f"{holder.get('command')}); wait for it to end or choose another "
                    f"hydra.run.dir (if that run is gone, delete {path})"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        except OSError as err:
            raise UserError(
                f"cannot write in the run directory {run_dir} ({err.strerror}); choose another "
                f"with hydra.run.dir=DIR"
            ) from err
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        lock = RunLock(path, owner)
        atexit.register(lock.release)  # also when the run fails before it starts
        return lock
    raise UserError(f"cannot take the lock {path}: another run keeps taking it")


def _read_holder(path: Path) -> dict | None:
    """The lock's holder, or ``None`` for a lock that is unreadable (torn by a crash)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(holder: dict) -> bool:
    """Whether the holder is known to be gone: a process of this machine that no longer runs,
    or an earlier run of this SLURM job (SLURM requeues a job, on any node, only after all of
    its earlier run's processes are gone).

    Any other holder on another machine (a shared file system) cannot be checked and counts as
    alive.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job") == job:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            if int(holder["slurm_restart"]) < _restart_count():
                return True
    if holder.get("host") != socket.gethostname():
        return False
    if holder.get("pid") == os.getpid():  # this process's own earlier run, which ended
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def _restart_count() -> int:
    """How many times SLURM has requeued this job (``SLURM_RESTART_COUNT``, unset before the
    first requeue)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def check_room(folder: Path, needed: int) -> None:
    """Refuses to start a run whose first checkpoint ``folder`` could not hold.

    Writes and removes a probe file (the folder is writable) and compares ``needed`` bytes with
    the free space.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(
            f"cannot write checkpoints into {folder} ({err.strerror}); choose another hydra.run.dir"
        ) from err
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(
            f"no space left for checkpoints in {folder}: one needs ~{needed / 2**20:.0f} MB, "
            f"{free / 2**20:.0f} MB are free"
        )


def checkpoint_size(optimizer: torch.optim.Optimizer) -> int:
    """An estimate of a checkpoint's bytes: the weights and the optimizer's per-weight buffers
    (momentum: one; Adam's moments: two), which exist only after the first step."""
    weights, slots = 0, 0
    for group in optimizer.param_groups:
        weights += sum(p.numel() * p.element_size() for p in group["params"])
        slots = max(slots, 2 if "betas" in group else int(bool(group.get("momentum", 0))))
    return weights * (1 + slots)


def check_validation_split(val_set: Any) -> None:
    """Refuses a run whose first evaluation would fail: an empty validation split, or one whose
    first image does not read through the evaluation transform (its ``UserError``)."""
    size = size_of(val_set)
    if size == 0:
        raise UserError("the validation split is empty: the run could never be evaluated")
    if size:
        val_set[0]


def size_of(dataset: Any) -> int | None:
    """``len(dataset)``, or ``None`` for a dataset without a length (a stream)."""
    try:
        return len(dataset)
    except TypeError:
        return None
