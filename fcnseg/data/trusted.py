"""Datasets described by a model file: built from fcnseg's own dataset classes only.

A checkpoint or an exported model carries its training config, whose ``dataset.builder`` says
how the evaluation data was read (``_target_: fcnseg.data.CamVid``, root, ...). That node is
data from whoever wrote the file, so it is never given to Hydra's ``instantiate`` (which imports
and calls any ``_target_``): ``dataset_builder`` maps its ``_target_`` through the allow-list
``DATASETS`` and passes plain values only. A dataset config the user chose on the command line
(``dataset=NAME``) is the user's own and goes through Hydra as usual.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fcnseg.data.camvid import CamVid
from fcnseg.data.cityscapes import Cityscapes
from fcnseg.data.coco import COCOSegmentation
from fcnseg.data.folder import SegmentationFolder
from fcnseg.data.synthetic import SyntheticShapes
from fcnseg.data.voc import SBDSegmentation, VOCAugSegmentation, VOCSegmentation
from fcnseg.errors import UserError

#: The dataset classes a model file may name, by every path they have had in a ``_target_``.
DATASETS: dict[str, Callable[..., Any]] = {
    f"{path}.{cls.__name__}": cls
    for cls in (
        CamVid,
        Cityscapes,
        COCOSegmentation,
        SegmentationFolder,
        SyntheticShapes,
        SBDSegmentation,
        VOCAugSegmentation,
        VOCSegmentation,
    )
    for path in ("fcnseg.data", cls.__module__)
}
#: Hydra's keys that a builder node may hold; any other ``_key_`` is refused.
_HYDRA_KEYS = ("_target_", "_partial_")


def dataset_builder(node: Any, *, source: str, download: bool | None = False) -> Callable[..., Any]:
    """The dataset factory (``(split=, transform=) -> Dataset``) that ``node`` describes.

    Args:
        node: a ``dataset.builder`` config read from a model file.
        source: what it was read from, for messages (``checkpoint best.pt``).
        download: what the node's ``download`` option becomes: a model file never decides
            that something is downloaded and written (only the user's ``dataset.download``).

    Raises:
        UserError: a ``_target_`` outside ``DATASETS``, another Hydra key, or a value that is
            not plain data (anything holding a ``_target_`` of its own); named with its key.
    """
    if node is None:
        raise UserError(
            f"{source} does not say how its dataset is read; choose one with dataset=NAME "
            "dataset.root=DIR"
        )
    if not isinstance(node, Mapping):
        raise UserError(f"{source}: dataset.builder is not a mapping")
    target = node.get("_target_")
    if target not in DATASETS:
        raise UserError(
            f"{source}: dataset.builder._target_={target!r} is not one of fcnseg's datasets "
            f"({', '.join(sorted({c.__name__ for c in DATASETS.values()}))}); nothing was run"
        )
    kwargs = {}
    for key, value in node.items():
        key = str(key)
        if key.startswith("_"):
            if key not in _HYDRA_KEYS:
                raise UserError(f"{source}: dataset.builder.{key} is not allowed in a model file")
            continue
        _check_plain(value, f"dataset.builder.{key}", source)
        kwargs[key] = value
    if "download" in kwargs:
        kwargs["download"] = bool(download)
    return functools.partial(DATASETS[target], **kwargs)


def _check_plain(value: Any, key: str, source: str) -> None:
    """Raises unless ``value`` is plain data: scalars, lists and mappings of them, no
    ``_target_`` (or other Hydra key) at any depth."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if str(k).startswith("_"):
                raise UserError(
                    f"{source}: {key}.{k}={v!r} is not allowed in a model file (nothing from it "
                    "is imported or called)"
                )
            _check_plain(v, f"{key}.{k}", source)
        return
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        for i, v in enumerate(value):
            _check_plain(v, f"{key}[{i}]", source)
        return
    raise UserError(f"{source}: {key}={value!r} is not plain data")
