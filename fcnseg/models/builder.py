"""``build_model`` and ``load_model``: the public ways to get a model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from fcnseg.errors import UserError
from fcnseg.models import backbones, heads
from fcnseg.models.segmentation import SegmentationModel


def build_model(
    *,
    backbone: str | nn.Module,
    head: str | Callable[..., nn.Module],
    num_classes: int,
    pretrained: bool = False,
    backbone_options: Mapping[str, Any] | None = None,
    head_options: Mapping[str, Any] | None = None,
) -> SegmentationModel:
    """Builds a segmentation model.

    Args:
        backbone: a name in ``fcnseg.models.backbones`` (``"vgg16"``) or a built backbone.
        head: a name in ``fcnseg.models.heads`` (``"fcn8s"``) or a callable
            ``(feature_info, num_classes) -> nn.Module`` (a Hydra ``_partial_``).
        num_classes: number of classes scored.
        pretrained: ImageNet weights for a backbone given by name.
        backbone_options: extra keyword arguments for a backbone given by name.
        head_options: extra keyword arguments for a head given by name.
    """
    if isinstance(backbone, str):
        backbone = _lookup(backbones, backbone, "backbone")(
            **{"pretrained": pretrained, **dict(backbone_options or {})}
        )
    if isinstance(head, str):
        head = _lookup(heads, head, "head")
    head_module = head(backbone.feature_info, num_classes, **dict(head_options or {}))
    return SegmentationModel(backbone, head_module)


def build_model_from_config(config: Mapping[str, Any]) -> SegmentationModel:
    """Rebuilds the model a run was configured with (no pretrained download: weights follow).

    Only names inside ``fcnseg.models`` are resolved, so a checkpoint's config cannot make
    this import or call anything else.
    """

    def split(node: Mapping[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
        target = str(node.get("_target_", ""))
        prefix = f"fcnseg.models.{kind}s."
        if not target.startswith(prefix):
            raise UserError(f"the checkpoint's {kind}._target_={target!r} is not in {prefix}*")
        options = {k: v for k, v in node.items() if not k.startswith("_")}
        return target.rsplit(".", 1)[1], options

    try:
        backbone_name, backbone_options = split(config["backbone"], "backbone")
        head_name, head_options = split(config["head"], "head")
        num_classes = int(config["dataset"]["num_classes"])
    except (KeyError, TypeError) as err:
        raise UserError(f"the checkpoint's config lacks the model description ({err})") from err
    backbone_options.update(pretrained=False, weights=None)
    return build_model(
        backbone=backbone_name,
        head=head_name,
        num_classes=num_classes,
        backbone_options=backbone_options,
        head_options=head_options,
    )


def load_model(checkpoint_path: str | Path, map_location: str = "cpu") -> SegmentationModel:
    """Rebuilds a trained model from a checkpoint file alone, in eval mode."""
    from fcnseg.utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint_path, map_location=map_location)
    model = build_model_from_config(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def _lookup(namespace, name: str, kind: str):
    fn = getattr(namespace, name, None)
    if fn is None or name.startswith("_") or not callable(fn):
        known = ", ".join(n for n in namespace.__all__ if n[0].islower())
        raise UserError(f"unknown {kind} {name!r}; known: {known}")
    return fn
