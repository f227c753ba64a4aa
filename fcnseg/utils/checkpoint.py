"""Checkpoints are data: tensors and plain Python values, read with ``weights_only=True``.

Writes are atomic (temporary file in the same folder, fsync, rename), so a process killed at any
moment leaves either the previous file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcnseg.errors import UserError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically writes ``state`` to ``path``.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
    renamed over ``path`` (an atomic step on POSIX file systems): a reader, or a process killed at
    any moment, sees the previous checkpoint or the new one. Temporary files that a killed save
    left behind are removed by the next save of the same name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file private (0600); give it the mode any new file would get.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it
    os.umask(mask)
    return mask


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint without executing anything stored in it.

    ``torch.load(weights_only=True)`` rebuilds only tensors and plain Python values; a file that
    names any other object (a pickled class, a function to call) is refused before anything in
    it runs.

    Raises:
        UserError: the file is missing, damaged, holds other objects, or has no ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # no refused object: a damaged file
            raise UserError(
                f"checkpoint {path} is not a readable PyTorch checkpoint ({_reason(err)})"
            ) from err
        raise UserError(
            f"checkpoint {path} holds objects other than tensors and plain values and was "
            f"refused unread ({_reason(err)}); only load files you trust, and re-save them as "
            f"plain state dicts"
        ) from err
    except Exception as err:
        raise UserError(
            f"checkpoint {path} is not a readable PyTorch checkpoint ({_reason(err)})"
        ) from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"checkpoint {path} has no 'model' entry; it is not an fcnseg checkpoint")
    return ckpt


def _reason(err: BaseException) -> str:
    """The informative line of a (long, multi-paragraph) torch.load error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Trying to load", "Unsupported", "PytorchStreamReader")):
            return line.split(". This is an internal", 1)[0]
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


def rng_state() -> dict[str, Any]:
    """This process's random generators' states, in weights_only-loadable types.

    The CUDA generator saved is the current device's, and only once CUDA is in use (asking for
    every device's would create a CUDA context on each GPU from every process).
    """
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
