"""Checkpoints are data: tensors and plain Python values, read with ``weights_only=True``.

Writes are atomic (temporary file in the same folder, fsync, rename), so a process killed at any
moment leaves either the previous file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcnseg.errors import UserError
from fcnseg.utils.atomic import AtomicWriteError, atomic_path, temporary_pattern


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically writes ``state`` to ``path``.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is
    renamed over ``path`` (an atomic step on POSIX file systems): a reader, or a process killed at
    any moment, sees the previous checkpoint or the new one. Temporary files that a killed save
    left behind are removed by the next save of the same name.

    Raises:
        UserError: the file could not be written (a full disk, a read-only folder); the message
            names the file, the reason, and says that the previous file is intact.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as err:  # torch.save's writer raises RuntimeError
        raise UserError(_save_failure(state, path, err)) from err
    for stale in path.parent.glob(temporary_pattern(path)):
        with contextlib.suppress(OSError):
            stale.unlink()


def _save_failure(state: Any, path: Path, err: BaseException) -> str:
    if isinstance(err, AtomicWriteError) and err.__cause__ is not None:
        err = err.__cause__  # its own sentence lacks the checkpoint's size
    kept = f"the previous {path.name} is intact" if path.is_file() else "nothing was written"
    needed = sum(t.numel() * t.element_size() for t in _tensors(state))
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free < needed):
        free_mb = "?" if free is None else f"{free / 2**20:.0f}"
        why = f"no space left on device: needs ~{needed / 2**20:.0f} MB, {free_mb} MB free"
    else:
        why = getattr(err, "strerror", None) or " ".join(str(err).split())[:200]
    return f"cannot write checkpoint {path} ({why}); {kept}"


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def load_weights_only(
    path: str | Path, *, what: str, map_location: str | torch.device = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)``, with every failure as one sentence about ``what``.

    ``weights_only=True`` rebuilds only tensors and plain Python values; a file that names any
    other object (a pickled class, a function to call) is refused before anything in it runs.
    Every reader of checkpoints and weights files goes through here.

    Args:
        path: the file.
        what: how the user named it, for the message (``checkpoint PATH``,
            ``backbone.weights=PATH``).
        map_location: where the tensors go.

    Raises:
        UserError: the path is missing or a directory, the file is not one that ``torch.save``
            writes, is damaged, or holds other objects than tensors and plain values.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} is a directory, not a checkpoint file")
    if not path.is_file():
        raise UserError(f"{what} does not exist")
    with open(path, "rb") as f:
        head = f.read(256)
    # torch.save writes a zip archive; before PyTorch 1.6 (and with pickle itself) a pickle,
    # whose protocol 2+ opcode is 0x80. Anything else (a text file, an image) is not a
    # checkpoint, and torch.load would only report an unknown opcode such as "101".
    if path.suffix.lower() == ".onnx" and not head.startswith((b"PK\x03\x04", b"\x80")):
        raise UserError(
            f"{what} is an exported ONNX model, not a checkpoint; run it with runtime=onnx "
            f"model={path}"
        )
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise UserError(f"{what} is not a readable PyTorch checkpoint file: {_not_torch(head)}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # no refused object: a damaged file
            raise UserError(
                f"{what} is not a readable PyTorch checkpoint file ({error_summary(err)})"
            ) from err
        raise UserError(
            f"{what} holds objects other than tensors and plain values and was refused unread "
            f"({error_summary(err)}); only load files you trust, and re-save them as plain state "
            f"dicts"
        ) from err
    except Exception as err:
        raise UserError(
            f"{what} is not a readable PyTorch checkpoint file ({error_summary(err)})"
        ) from err


def _not_torch(head: bytes) -> str:
    """What a file that ``torch.save`` did not write is, from its first bytes."""
    if not head:
        return "it is empty"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not merely a character cut at the end of the sample
            return "it starts with neither a zip archive nor a pickle, as torch.save's files do"
    return "it is a text file, not one that torch.save writes"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads an fcnseg checkpoint without executing anything stored in it.

    Raises:
        UserError: the file is missing, damaged, holds other objects (``load_weights_only``),
            or has no ``model``.
    """
    what = f"checkpoint {path}"
    ckpt = load_weights_only(path, what=what, map_location=map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{what} has no 'model' entry; it is not an fcnseg checkpoint")
    return ckpt


def error_summary(err: BaseException) -> str:
    """The informative line of a long, multi-paragraph error from ``torch.load`` or
    ``load_state_dict``, at most 200 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Trying to load", "Unsupported", "PytorchStreamReader")):
            return line.split(". This is an internal", 1)[0][:200]
        if line.startswith(("Missing key(s)", "Unexpected key(s)", "size mismatch")):
            return line[:200]
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
