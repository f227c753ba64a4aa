"""Where outputs may go, checked before anything is computed, and how they are written.

An output never goes among the files it is computed from (a dataset's images, the ground truth
they are scored against), nor over the checkpoint or model it was computed with, nor over a
file of an earlier run unless the user says to replace it. The checks run before the work, so
that a refusal never follows an hour of it.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from fcnseg.errors import UserError
from fcnseg.utils.atomic import AtomicWriteError, atomic_path


def refuse_overlap(
    path: str | Path, protected: Sequence[str | Path], *, key: str, what: str
) -> None:
    """Raises a ``UserError`` when ``path`` is, lies inside or contains one of ``protected``.

    Outputs never go among the files they were computed from: predictions named after the
    images would replace the images, or the ground truth they are scored against.

    Args:
        path: the output file or folder.
        protected: the folders (or files) to keep out of, e.g. ``dataset.data_folders()``.
        key: the option that gave ``path``, to name it.
        what: what ``protected`` holds, e.g. ``"the dataset folder"``.
    """
    out = Path(path).expanduser().resolve()
    for guarded in protected:
        inner = Path(guarded).expanduser().resolve()
        if out == inner:
            relation = "is"
        elif inner in out.parents:
            relation = "is inside"
        elif out in inner.parents:
            relation = "contains"
        else:
            continue
        raise UserError(
            f"{key}={path} {relation} {what} {guarded}, whose files must not be overwritten; "
            "choose a folder outside it"
        )


def check_output_dir(
    path: str | Path,
    *,
    key: str,
    protected: Sequence[str | Path] = (),
    what: str = "the dataset folder",
    overwrite: bool = False,
    overwrite_key: str = "overwrite",
) -> Path:
    """Checks, before anything is computed, that the folder ``path`` may receive outputs.

    It must not be a file, nor overlap ``protected`` (``refuse_overlap``), and it must be
    empty or missing unless ``overwrite`` (the outputs replace files of the same name).

    Returns:
        ``path`` as a ``Path``.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{key}={path} is a file, not a folder; give a folder for the outputs")
    refuse_overlap(out, protected, key=key, what=what)
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise UserError(
            f"{key}={path} is not empty; choose an empty or new folder, or pass "
            f"{overwrite_key}=true to replace the files of the same name in it"
        )
    return out


def check_output_file(
    path: str | Path,
    *,
    key: str,
    protected: Sequence[str | Path] = (),
    what: str = "the dataset folder",
) -> Path:
    """Checks, before anything is computed, that the file ``path`` may be written: it is not
    a folder and lies outside ``protected`` (``refuse_overlap``)."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise UserError(f"{key}={path} is a folder; give the file to write")
    refuse_overlap(out, protected, key=key, what=what)
    return out


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once links are resolved, or the same
    inode (a hard link, a bind mount)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def refuse_read_files(
    path: str | Path, read: Mapping[str, str | Path | None], *, key: str, folder: bool = False
) -> None:
    """Raises a ``UserError`` when the output ``path`` is one of the files a command reads
    (``read``: option -> file, e.g. ``{"checkpoint": "best.pt"}``), or, for an output
    ``folder``, contains one: a checkpoint or exported model is never written over."""
    out = Path(path).expanduser()
    for name, file in read.items():
        if not file:
            continue
        given = Path(file).expanduser()
        if _same_file(out, given):
            raise UserError(
                f"{key}={path} is the file given as {name}=, which is read, never written; "
                "choose another file"
            )
        if folder and out.resolve() in given.resolve().parents:
            raise UserError(
                f"{key}={path} contains the file given as {name}= ({file}), which is read, "
                "never written; choose a folder without it"
            )


@functools.cache
def _writes_rgb(suffix: str) -> bool:
    """Whether Pillow writes an RGB picture to a file named ``*<suffix>`` (tried in memory)."""
    Image.init()
    fmt = Image.registered_extensions().get(suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        return False
    try:
        Image.new("RGB", (2, 2)).save(io.BytesIO(), format=fmt)
    except Exception:  # plugins refuse a mode or miss a codec with assorted types
        return False
    return True


def check_evaluation_outputs(
    dataset: Any,
    *,
    out: str | Path | None = None,
    grid: str | Path | None = None,
    tensorboard: str | Path | None = None,
    save_predictions: str | Path | None = None,
    overwrite: bool = False,
    read: Mapping[str, str | Path | None] | None = None,
) -> None:
    """Checks an evaluation's outputs before it runs, so that a refusal never follows a run
    and no file is written over.

    Every output refuses, whatever ``overwrite`` says, to be (or, for a folder, to contain) a
    file of ``read`` (the checkpoint or model evaluated) and to be, lie inside or contain a
    folder of the dataset (``dataset.data_folders()``). The metrics file ``out`` must be named
    ``*.json``, the picture ``grid`` must be a file Pillow writes (``.png``, ``.jpg``...), both
    must be new unless ``overwrite``; the folders ``tensorboard`` and ``save_predictions`` must
    be new or empty unless ``overwrite``. No two outputs may share a path, and none may lie
    inside ``save_predictions``, whose file names are the dataset's.

    Args:
        dataset: the evaluated dataset.
        out: the metrics JSON (``out=``).
        grid: the picture of the first predictions (``eval.grid=``).
        tensorboard: the TensorBoard folder (``eval.tensorboard=``).
        save_predictions: the folder of label maps (``eval.save_predictions=``).
        overwrite: ``eval.overwrite``: replace an existing ``out`` or ``grid``, write into
            non-empty folders.
        read: option -> file of what the evaluation reads, e.g.
            ``{"checkpoint": ..., "model": ...}``.
    """
    folders = dataset.data_folders() if callable(getattr(dataset, "data_folders", None)) else []
    read = read or {}
    outputs = {
        key: str(path)  # a value such as out=123 comes from the command line as a number
        for key, path in (
            ("out", out),
            ("eval.grid", grid),
            ("eval.tensorboard", tensorboard),
            ("eval.save_predictions", save_predictions),
        )
        if path
    }
    for key, path in outputs.items():
        is_folder = key in ("eval.tensorboard", "eval.save_predictions")
        refuse_read_files(path, read, key=key, folder=is_folder)
        if key == "eval.tensorboard":
            # TensorBoard adds an events file of a new name: it replaces nothing, but a folder
            # of earlier events would show both evaluations as one.
            target = check_output_dir(path, key=key, protected=folders, overwrite=True)
            if not overwrite and target.is_dir() and any(target.iterdir()):
                raise UserError(
                    f"{key}={path} is not empty; choose an empty or new folder, or pass "
                    "eval.overwrite=true to add this evaluation's events to it"
                )
            continue
        if is_folder:
            check_output_dir(
                path, key=key, protected=folders, overwrite=overwrite,
                overwrite_key="eval.overwrite",
            )  # fmt: skip
            continue
        target = check_output_file(path, key=key, protected=folders)
        parent = target.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise UserError(f"{key}={path} cannot be created: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"{key}={path} cannot be created: the folder {parent} is read-only")
        if key == "out" and target.suffix.lower() != ".json":
            raise UserError(f"out={path} is not a .json file name; the metrics are written as JSON")
        if key == "eval.grid" and not _writes_rgb(target.suffix):
            raise UserError(
                f"eval.grid={path} is not a picture file name Pillow writes "
                f"({target.suffix or 'no extension'}); name a .png or .jpg file"
            )
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise UserError(f"{key}={path} exists; pass eval.overwrite=true to replace it")
    resolved = {key: Path(path).expanduser().resolve() for key, path in outputs.items()}
    for key, path in resolved.items():
        for other, other_path in resolved.items():
            if other == key:
                continue
            if path == other_path:
                raise UserError(f"{key}={outputs[key]} is also {other}=; give each its own path")
            if other == "eval.save_predictions" and other_path in path.parents:
                raise UserError(
                    f"{key}={outputs[key]} is inside eval.save_predictions={outputs[other]}, "
                    "whose files are named after the dataset's images; choose a path outside it"
                )


def write_json(data: Any, path: str | Path, *, key: str = "out", overwrite: bool = False) -> Path:
    """Writes ``data`` as indented JSON to ``path`` atomically, never over a file unless
    ``overwrite``.

    The text goes to a temporary file in the same folder, which then takes the name
    (``fcnseg.utils.atomic``): a killed process leaves the previous file or none, never half a
    file. Without ``overwrite`` the name is taken by a hard link, which fails where a file of
    that name appeared in the meantime (another program's), and that file is kept.

    Raises:
        UserError: ``path`` exists (without ``overwrite``), or it could not be written; the
            message names ``key``.
    """
    path = Path(path).expanduser()
    try:
        with atomic_path(path, replace=overwrite) as tmp:
            tmp.write_text(json.dumps(data, indent=2))
    except FileExistsError:
        raise UserError(
            f"{key}={path} appeared while this ran; it is kept and nothing was written"
        ) from None
    except AtomicWriteError as err:
        why = getattr(err.__cause__, "strerror", None) or err
        raise UserError(f"{key}={path} could not be written: {why}") from None
    return path
