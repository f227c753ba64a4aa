"""Weights of the widely used PyTorch port of the Caffe FCNs (``torchfcn``) as fcnseg models.

That port's ``FCN32s``, ``FCN16s``, ``FCN8s`` and ``FCN8sAtOnce`` are VGG16 FCNs whose state
dicts name every layer after the reference Caffe nets: ``conv1_1.weight`` ... ``conv5_3``,
``fc6``, ``fc7``, ``score_fr``, ``score_pool4``, ``score_pool3``, ``upscore2``,
``upscore_pool4``, ``upscore8`` / ``upscore16`` / ``upscore``. fcnseg's VGG16 with the FCN heads
has the same layers under the same names (the backbone's under ``backbone.features.`` and
``backbone.fc.``, the head's under ``head.``) and the same alignment, so the import is a
renaming, and the imported model computes the same logits. Its published weights were converted
from Caffe: they expect Caffe's input (BGR, 0-255, mean subtracted: ``dataset.normalize=caffe``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fcnseg.errors import UserError
from fcnseg.utils.checkpoint import error_summary, load_weights_only

# Layers of each head beyond VGG16's conv1_1 ... fc7, in the port's names.
HEAD_LAYERS = {
    "fcn32s": ("score_fr", "upscore"),
    "fcn16s": ("score_fr", "score_pool4", "upscore2", "upscore16"),
    "fcn8s": ("score_fr", "score_pool4", "score_pool3", "upscore2", "upscore_pool4", "upscore8"),
}
HEAD_LAYERS["fcn8s_atonce"] = HEAD_LAYERS["fcn8s"]
# The port's class names, as its training checkpoints record them under "arch".
ARCHS = {"FCN32s": "fcn32s", "FCN16s": "fcn16s", "FCN8s": "fcn8s", "FCN8sAtOnce": "fcn8s_atonce"}
VGG16_LAYERS = tuple(
    f"conv{stage}_{i}" for stage, n in enumerate((2, 2, 3, 3, 3), start=1) for i in range(1, n + 1)
) + ("fc6", "fc7")
# The port's nets are the reference ones: conv1_1 padded by 100, a valid 7x7 fc6.
REFERENCE_GEOMETRY = {"first_padding": 100, "fc6_padding": 0}
_KEY = re.compile(r"^([a-z0-9_]+)\.(weight|bias)$")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict in a torchfcn weights file, and the head its ``arch`` names, if any.

    Accepts the published ``*_from_caffe.pth`` files (a bare state dict) and the port's own
    training checkpoints (``model_state_dict`` beside ``arch``). Read with
    ``weights_only=True``: nothing in the file runs.
    """
    data = load_weights_only(path, what=f"input={path}")
    arch = None
    if isinstance(data, dict) and "model_state_dict" in data:
        arch = ARCHS.get(str(data.get("arch")))
        data = data["model_state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"input={path} holds no state dict of tensors")
    return dict(data), arch


def detect_head(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``fcn32s``, ``fcn16s`` or ``fcn8s`` from the layers present (the at-once FCN-8s has the
    same layers as the staged one and cannot be told apart)."""
    if "upscore8.weight" in state_dict:
        return "fcn8s"
    if "upscore16.weight" in state_dict:
        return "fcn16s"
    return "fcn32s"


def to_fcnseg(state_dict: Mapping[str, torch.Tensor], *, head: str) -> dict[str, torch.Tensor]:
    """Renames a torchfcn state dict into the keys of fcnseg's ``vgg16`` + ``head`` model.

    Raises:
        UserError: ``head`` is not an FCN head, or the state dict lacks one of its layers or has
            one that this head does not (naming the first such key).
    """
    if head not in HEAD_LAYERS:
        raise UserError(
            f"head={head} has no torchfcn counterpart; use one of {', '.join(HEAD_LAYERS)}"
        )
    expected = {
        f"{layer}.{param}"
        for layer in VGG16_LAYERS + HEAD_LAYERS[head]
        for param in ("weight", "bias")
        if not (layer.startswith("upscore") and param == "bias")  # no bias, as in Caffe
    }
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        found = detect_head(state_dict)
        hint = f" (its layers are those of {found}: head={found})" if found != head else ""
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which {head} has not"
        raise UserError(f"the weights are not a torchfcn {head}: the state dict {what}{hint}")
    renamed = {}
    for key, value in state_dict.items():
        layer, param = _KEY.match(key).groups()
        if layer.startswith("conv"):
            renamed[f"backbone.features.{layer}.{param}"] = value
        elif layer in ("fc6", "fc7"):
            renamed[f"backbone.fc.{layer}.{param}"] = value
        else:
            renamed[f"head.{layer}.{param}"] = value
    return renamed


def from_fcnseg(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``to_fcnseg``: an fcnseg VGG16 FCN's weights in torchfcn's names."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("backbone.features.", "backbone.fc.", "head."):
            if key.startswith(prefix):
                out[key[len(prefix) :]] = value
                break
        else:
            raise UserError(f"{key} is not a layer of a VGG16 FCN (no torchfcn counterpart)")
    return out


def import_checkpoint(path: str | Path, *, config: dict[str, Any]) -> dict[str, Any]:
    """An fcnseg checkpoint holding torchfcn weights: ``{"model", "config", "iteration",
    "source"}``, loadable by ``fcnseg.load_model`` and ``scripts/evaluate.py``.

    ``config`` describes the model as a training run's config does (``backbone``, ``head``,
    ``dataset`` nodes); its ``dataset.normalize`` is set to ``caffe``, the port's input
    convention, and its ``backbone.pretrained`` to false. The number of classes must match the
    weights' ``score_fr``.
    """
    from fcnseg.models.builder import build_from_description
    from fcnseg.models.description import KEY, ModelDescription

    state_dict, arch = read_state_dict(path)
    head = str(config["head"]["_target_"]).rsplit(".", 1)[-1]
    backbone = str(config["backbone"]["_target_"]).rsplit(".", 1)[-1]
    if arch is not None and arch != head and {arch, head} != {"fcn8s", "fcn8s_atonce"}:
        raise UserError(f"input={path} holds a torchfcn {arch}; use head={arch}")
    renamed = to_fcnseg(state_dict, head=head)
    classes = state_dict["score_fr.weight"].shape[0]
    num_classes = int(config["dataset"]["num_classes"])
    if classes != num_classes:
        raise UserError(
            f"input={path} scores {classes} classes but dataset.num_classes={num_classes}; "
            f"choose the dataset the weights were trained on"
        )
    config = {**config, "dataset": {**config["dataset"], "normalize": "caffe"}}
    # A backbone config that changes the geometry (vgg_tiny's, made for small images) would run
    # the same weights misaligned; unset keys already default to the reference values.
    geometry = {k: v for k, v in REFERENCE_GEOMETRY.items() if k in config["backbone"]}
    config["backbone"] = {**config["backbone"], "pretrained": False, "weights": None, **geometry}
    description = ModelDescription.from_config(config, source=f"input={path}")
    model = build_from_description(description)
    try:
        model.load_state_dict(renamed, strict=True)
    except RuntimeError as err:
        raise UserError(
            f"input={path} does not fit backbone={backbone} head={head} (torchfcn nets are "
            f"VGG16 FCNs: backbone=vgg16; {error_summary(err)})"
        ) from err
    return {
        "model": model.state_dict(),
        KEY: description.to_dict(),
        "config": config,
        "iteration": 0,
        "source": {"format": "torchfcn", "path": str(path), "head": head},
    }
