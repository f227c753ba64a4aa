"""``build_model``: a segmentation network from a backbone and a head, by registered name, as
Hydra partials, or built; ``build_from_description`` and ``build_model_from_config``: the
network a model file names, with random weights (``fcnseg.models.loading`` loads them).

A network built from registered builders records them in its ``architecture`` attribute, from
which ``fcnseg.models.description.describe`` writes the description that model files carry.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from fcnseg.errors import UserError
from fcnseg.models.description import BACKBONES, HEADS, ModelDescription
from fcnseg.models.segmentation import SegmentationModel


def build_model(
    *,
    backbone: str | nn.Module | Callable[..., nn.Module],
    head: str | Callable[..., nn.Module],
    num_classes: int,
    pretrained: bool = False,
    backbone_options: Mapping[str, Any] | None = None,
    head_options: Mapping[str, Any] | None = None,
) -> SegmentationModel:
    """Builds a segmentation model.

    A head may ask for a variant of the backbone in its ``backbone_options`` attribute: SegNet
    an encoder whose poolings return their indices (``indices=True, fc=False``), DeconvNet one
    that keeps fc6/fc7 too. A backbone given by name or as a callable is built that way, so
    ``build_model(backbone="vgg16_bn", head="segnet", ...)`` is SegNet's own encoder.

    Args:
        backbone: a name in ``fcnseg.models.backbones`` (``"vgg16"``), a callable that builds
            one from keyword arguments (a Hydra ``_partial_`` backbone config), or a built one.
        head: a name in ``fcnseg.models.heads`` (``"fcn8s"``) or a callable
            ``(feature_info, num_classes) -> nn.Module`` (a Hydra ``_partial_``).
        num_classes: number of classes scored.
        pretrained: ImageNet weights for a backbone given by name.
        backbone_options: extra keyword arguments for a backbone given by name.
        head_options: extra keyword arguments for a head given by name.
    """
    if isinstance(head, str):
        head_name, head_options = head, dict(head_options or {})
        head = _lookup(HEADS, head, "head")
    else:
        head_name, head_options = _registered(head, HEADS), _keywords(head)
    if isinstance(backbone, str):
        backbone_name, backbone_kwargs = backbone, dict(backbone_options or {})
        build = _lookup(BACKBONES, backbone, "backbone")
        backbone = functools.partial(build, **{"pretrained": pretrained, **backbone_kwargs})
    elif isinstance(backbone, nn.Module):
        backbone_name, backbone_kwargs = None, {}
    else:
        backbone_name, backbone_kwargs = _registered(backbone, BACKBONES), _keywords(backbone)
    if not isinstance(backbone, nn.Module):
        backbone = _backbone_for_head(head, backbone)
    head_module = head(backbone.feature_info, num_classes, **dict(head_options or {}))
    model = SegmentationModel(backbone, head_module)
    if backbone_name is not None and head_name is not None:
        # What ``describe`` writes into checkpoints: the builders by name, their options.
        model.architecture = {
            "backbone": backbone_name,
            "backbone_options": backbone_kwargs,
            "head": head_name,
            "head_options": head_options,
        }
    return model


def _registered(fn: Callable, registry: Mapping[str, Callable]) -> str | None:
    """The registered name of ``fn`` (or of the function inside its partials), else ``None``."""
    inner = _unwrap(fn)
    return next((name for name, f in registry.items() if f is inner), None)


def _keywords(fn: Callable) -> dict[str, Any]:
    """The keyword arguments that (nested) partials bind, outermost last."""
    chain = []
    while isinstance(fn, functools.partial):
        chain.append(fn.keywords)
        fn = fn.func
    return {k: v for keywords in reversed(chain) for k, v in keywords.items()}


def _backbone_for_head(
    head: Callable[..., nn.Module], backbone: Callable[..., nn.Module]
) -> nn.Module:
    """Calls ``backbone`` with the ``backbone_options`` that ``head`` asks for.

    Raises:
        UserError: the backbone's own options contradict the head's, or the backbone cannot
            build the variant the head needs (a ResNet has no pooling indices).
    """
    needs = dict(getattr(_unwrap(head), "backbone_options", {}))
    head_name, backbone_name = _name(head), _name(backbone)
    given = backbone.keywords if isinstance(backbone, functools.partial) else {}
    for key, value in needs.items():
        if key in given and given[key] != value:
            raise UserError(
                f"head {head_name} needs backbone.{key}={_yaml(value)}, not "
                f"backbone.{key}={_yaml(given[key])}; remove that option"
            )
    try:
        params = inspect.signature(backbone).parameters.values()
    except ValueError as err:  # the partial binds a keyword the builder lacks
        accepted = inspect.signature(_unwrap(backbone)).parameters
        unknown = next((key for key in given if key not in accepted), None)
        if unknown is None:
            raise
        raise UserError(f"backbone.{unknown} is not an option of backbone {backbone_name}") from err
    accepted = {p.name for p in params}
    if needs and not any(p.kind is p.VAR_KEYWORD for p in params):
        unknown = [key for key in needs if key not in accepted]
        if unknown:
            wanted = ", ".join(f"{key}={_yaml(needs[key])}" for key in needs)
            raise UserError(
                f"head {head_name} needs a backbone built with {wanted}, which {backbone_name} "
                f"cannot build; use a VGG backbone (vgg16_bn, vgg16, vgg_tiny)"
            )
    try:
        return backbone(**needs)
    except TypeError as err:  # a misspelt option (``+backbone.widht=3``) reaches a constructor
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown is None:
            raise
        raise UserError(
            f"backbone.{unknown.group(1)} is not an option of backbone {backbone_name}"
        ) from err


def build_model_from_config(config: Mapping[str, Any]) -> SegmentationModel:
    """Rebuilds the model a run was configured with (no pretrained download: weights follow).

    The config's ``backbone`` and ``head`` are read as a version 0 ``ModelDescription``: only
    fcnseg's registered builders, by name, with plain options; nothing else is imported or
    called.
    """
    return build_from_description(
        ModelDescription.from_config(config, source="the checkpoint's config")
    )


def build_from_description(description: ModelDescription) -> SegmentationModel:
    """The network a ``ModelDescription`` names, with random weights (a checkpoint's follow)."""
    return build_model(
        backbone=description.backbone,
        head=description.head,
        num_classes=description.num_classes,
        backbone_options={**description.backbone_options, "pretrained": False, "weights": None},
        head_options=description.head_options,
    )


def _unwrap(fn: Callable) -> Callable:
    """The function inside (nested) ``functools.partial`` objects, as Hydra's ``_partial_``
    makes them."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _name(fn: Callable) -> str:
    return getattr(_unwrap(fn), "__name__", type(fn).__name__)


def _yaml(value: Any) -> str:
    """A value as it is written on the command line (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _lookup(registry: Mapping[str, Callable], name: str, kind: str) -> Callable:
    fn = registry.get(name)
    if fn is None:
        raise UserError(f"unknown {kind} {name!r}; known: {', '.join(registry)}")
    return fn
