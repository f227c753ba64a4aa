"""What an exported file carries besides its graph: fcnseg's metadata, written at export and read
back before anything runs.

The file's metadata (``metadata_props``, string to string) carries what a consumer needs besides
the graph, so that nothing else has to travel with it:

======================  =========================================================================
key                     value
======================  =========================================================================
``class_names``         JSON list, one name per output channel
``palette``             JSON list of ``[r, g, b]``, one per class
``ignore_index``        the label value of unlabelled pixels in training
``normalize``           ``imagenet``, ``caffe`` or ``none`` (fcnseg's names)
``normalization``       JSON ``{"mean", "std", "max_pixel_value", "channel_order"}``: the input
                        is ``(pixel / max_pixel_value - mean) / std`` per RGB channel, then
                        reordered to ``channel_order``
``iteration``           the training step of the weights
``miou``                the best validation mIoU training recorded (a fraction), when it evaluated
``model_description``   JSON: the ``ModelDescription`` (``fcnseg.models.description``)
``config``              JSON: the training configuration (dataset, model), as in a checkpoint
``outputs``             ``logits`` or ``labels`` (``deploy_metadata``)
``input_size``          JSON ``[height, width]``, or ``null`` for any size
======================  =========================================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fcnseg.deploy.optional import require
from fcnseg.errors import UserError
from fcnseg.models.description import KEY as DESCRIPTION_KEY
from fcnseg.models.description import ModelDescription
from fcnseg.models.info import ModelInfo


def info_metadata(
    info: ModelInfo,
    config: Mapping[str, Any] | None = None,
    description: ModelDescription | None = None,
) -> dict[str, str]:
    """``info`` (the model's ``description`` and the training ``config``) as ONNX
    ``metadata_props``: strings only."""
    n = info.normalization
    meta = {
        "class_names": json.dumps(list(info.class_names)),
        "palette": json.dumps([list(c) for c in info.palette]),
        "ignore_index": str(info.ignore_index),
        "normalize": info.normalize,
        "normalization": json.dumps(
            {
                "mean": list(n.mean),
                "std": list(n.std),
                "max_pixel_value": n.max_pixel_value,
                "channel_order": "BGR" if n.bgr else "RGB",
            }
        ),
        "iteration": str(info.iteration),
    }
    if info.miou is not None:
        meta["miou"] = repr(info.miou)
    if description is not None:
        meta[DESCRIPTION_KEY] = json.dumps(description.to_dict())
    if config is not None:
        meta["config"] = json.dumps(config)
    return meta


def deploy_metadata(*, outputs: str = "logits", input_size: Sequence[int] | None = None) -> dict:
    """What a deployment reads besides ``info_metadata``: ``outputs`` (``logits`` or
    ``labels``) and ``input_size`` (JSON ``[height, width]``, or ``null`` for any size)."""
    return {
        "outputs": outputs,
        "input_size": json.dumps(None if input_size is None else list(input_size)),
    }


def info_from_metadata(
    meta: Mapping[str, str], *, source: str | Path = "the ONNX file"
) -> tuple[ModelInfo, dict[str, Any] | None]:
    """The ``ModelInfo`` and training config that ``info_metadata`` wrote.

    The model description (``model_description``, or the ``config`` of files exported before
    it) is checked as a checkpoint's is (``ModelDescription``): a file naming anything but
    fcnseg's own builders is refused. Its classes and normalisation are those of the info.

    Raises:
        UserError: the metadata lack fcnseg's keys (a file not exported by fcnseg), or describe
            a model that is not fcnseg's.
    """
    missing = [key for key in ("class_names", "normalize") if key not in meta]
    if missing:
        raise UserError(
            f"{source} has no {' or '.join(missing)} in its metadata: it was not exported by "
            "fcnseg (fcnseg-export), so its classes and input normalisation are unknown"
        )
    description = ModelDescription.from_metadata(meta, source=str(source))
    try:
        if description is not None:
            info = ModelInfo.from_description(
                description,
                iteration=int(meta.get("iteration", 0)),
                miou=float(meta["miou"]) if "miou" in meta else None,
            )
        else:
            info = ModelInfo.create(
                class_names=json.loads(meta["class_names"]),
                palette=json.loads(meta["palette"]) if "palette" in meta else None,
                ignore_index=int(meta.get("ignore_index", 255)),
                normalize=meta["normalize"],
                iteration=int(meta.get("iteration", 0)),
                miou=float(meta["miou"]) if "miou" in meta else None,
            )
        config = json.loads(meta["config"]) if "config" in meta else None
    except (ValueError, TypeError) as err:
        raise UserError(f"{source}'s fcnseg metadata cannot be read ({err})") from err
    if config is not None and not isinstance(config, dict):
        raise UserError(f"{source}'s metadata 'config' is not a mapping")
    return info, config


def read_metadata(path: str | Path) -> tuple[ModelInfo, dict[str, Any] | None]:
    """The ``ModelInfo`` and training config stored in the ONNX file ``path``."""
    onnx = require("onnx", "reading an ONNX file")
    path = existing_file(path)
    model = onnx.load(str(path), load_external_data=False)
    return info_from_metadata({p.key: p.value for p in model.metadata_props}, source=path)


def existing_file(path: str | Path) -> Path:
    """``path`` as a ``Path``, once it is known to be a file.

    Raises:
        UserError: it is missing or not a file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    return path
