"""The one loader of pretrained backbone weights: none, a local file, or torchvision's ImageNet.

Every backbone builder ends with ``load_pretrained``, which resolves where the weights come
from (as timm's ``build_model_with_cfg`` does for its models), loads them, records the source
on the backbone (``weights_source``, with the sha256 of the file read) and, if asked, freezes
its BatchNorm layers.

A local file (``backbone.weights=PATH``) is either a torchvision-format state dict (a bare dict
of tensors, or ``{"state_dict": ...}``), handed to the backbone's own ``load_torchvision`` which
renames torchvision's tensors onto its layers, or an fcnseg training checkpoint, whose
``backbone.*`` tensors are the backbone's own under its own names. Either way every tensor's
name and shape is checked (``load_by_names``) and the first mismatch is named.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from fcnseg.errors import UserError
from fcnseg.utils.checkpoint import error_summary, load_weights_only

Backbone = TypeVar("Backbone", bound=nn.Module)
#: where a backbone's weights come from: a local file, or ``None`` (``pretrained`` decides).
WeightsSource = str | Path | None

#: ``weights_source`` of a backbone that loaded no weights.
RANDOM_INIT = "random init"
#: the prefix of the backbone's tensors in an fcnseg training checkpoint's ``model``.
CHECKPOINT_PREFIX = "backbone."
#: digits of the sha256 shown in ``weights_source`` (enough to tell files apart at a glance).
SHA256_SHOWN = 12


def load_pretrained(
    model: Backbone,
    *,
    name: str,
    arch: str | None,
    pretrained: bool,
    weights: str | Path | None,
    frozen_bn: bool = False,
) -> Backbone:
    """Loads ``model``'s weights from the source asked for and returns it.

    Sets ``model.weights_source`` (where the weights came from, with the first digits of the
    file's sha256, or ``RANDOM_INIT``) and ``model.weights_sha256`` (the file's whole digest,
    or ``None``).

    Args:
        model: a freshly built backbone with a ``load_torchvision(state_dict)`` method.
        name: the backbone's name, for messages (``vgg16_bn``).
        arch: the torchvision model whose ImageNet weights fit it (``vgg16_bn``), or ``None``
            where there are none (``vgg_tiny``).
        pretrained: torchvision's ImageNet weights (downloaded once into the torch hub cache).
        weights: a local file: a torchvision-format state dict or an fcnseg training
            checkpoint (its backbone); it takes precedence over ``pretrained``.
        frozen_bn: replace the BatchNorm layers by frozen ones once the weights are in
            (``fcnseg.models.norm.freeze_batch_norm``).

    Raises:
        UserError: the source is unavailable or its weights do not fit the backbone.
    """
    digest = None
    if weights is not None:
        label = f"backbone.weights={weights}"
        found = read_weights_file(weights)
        digest = found.sha256
        kind = "the backbone of an fcnseg checkpoint, " if found.checkpoint else ""
        source = f"{label} ({kind}sha256 {digest[:SHA256_SHOWN]})"
        if found.checkpoint:
            try:
                load_by_names(model, found.state)
            except UserError as err:
                raise UserError(
                    f"{label} is an fcnseg checkpoint whose backbone does not fit backbone "
                    f"{name}: {err}"
                ) from err
        else:
            _load_torchvision(model, found.state, f"{label} is not", arch or name, name)
    elif pretrained:
        if arch is None:
            raise UserError(f"{name} has no pretrained weights; use backbone.pretrained=false")
        state, path = torchvision_state_dict(arch)
        digest = file_sha256(path) if path.is_file() else None  # read from where torch put it
        shown = f", sha256 {digest[:SHA256_SHOWN]}" if digest else ""
        source = f"torchvision's ImageNet {arch} weights ({path.name}{shown})"
        _load_torchvision(
            model, state, f"torchvision's ImageNet {arch} weights are not", arch, name
        )
    else:
        source = RANDOM_INIT
    model.weights_source = source
    model.weights_sha256 = digest
    if frozen_bn:
        from fcnseg.models.norm import freeze_batch_norm

        if freeze_batch_norm(model) == 0:
            raise UserError(
                f"backbone.frozen_bn=true but backbone {name} has no BatchNorm layer to freeze"
            )
    return model


def torchvision_builder(
    arch: str, backbone: Callable[[bool], Backbone], doc: str
) -> Callable[..., Backbone]:
    """The public builder of a backbone taken whole from torchvision model ``arch``.

    Such backbones (the ResNets, MobileNetV2) differ only in the network they wrap, so one
    builder serves them all: ``arch(*, pretrained=False, weights=None, fc=True,
    frozen_bn=False)`` builds ``backbone(fc)`` and loads its weights with ``load_pretrained``.
    It is named ``arch`` in the module that defines ``backbone``, where it is assigned, so
    configs, model descriptions and pickle find it by that name.
    """

    def build(
        *,
        pretrained: bool = False,
        weights: WeightsSource = None,
        fc: bool = True,
        frozen_bn: bool = False,
    ) -> Backbone:
        model = backbone(fc)
        return load_pretrained(
            model, name=arch, arch=arch, pretrained=pretrained, weights=weights,
            frozen_bn=frozen_bn,
        )  # fmt: skip

    build.__name__ = build.__qualname__ = arch
    build.__module__ = backbone.__module__
    build.__doc__ = doc
    return build


def _load_torchvision(
    model: nn.Module, state: dict[str, torch.Tensor], what: str, arch: str, name: str
) -> None:
    try:
        model.load_torchvision(state)
    except (KeyError, RuntimeError, UserError) as err:
        if isinstance(err, UserError):
            detail = str(err)
        elif isinstance(err, KeyError):
            detail = f"missing key {err.args[0]}"
        else:
            detail = error_summary(err)
        raise UserError(
            f"{what} a torchvision {arch} state dict that fits backbone {name}: {detail}"
        ) from err


def load_by_names(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    rename: Callable[[str], str | None] = lambda key: key,
    *,
    dropped: Callable[[str], bool] = lambda key: False,
) -> None:
    """Loads the file's tensors ``state`` into ``module``, checking every name and shape.

    Each tensor of ``module``'s state dict comes from the file's tensor ``rename(key)``
    (``None``: not in such files, it keeps its initialisation). A Linear layer's 2-D weight
    fills a convolution that stands for it (``linear_weight_as_conv``'s reshape). BatchNorm's
    ``num_batches_tracked`` counters may be absent on either side (a frozen BatchNorm has none).

    Args:
        module: the backbone.
        state: the file's tensors, by the file's names.
        rename: the file's name of each of ``module``'s tensors.
        dropped: the file's tensors that the backbone does not use, knowingly (the 1000-way
            ImageNet classifier of a backbone without it).

    Raises:
        UserError: one sentence naming the first mismatch in ``module``'s order (a tensor the
            file lacks, or one of another shape), else the file's first unexpected tensor,
            and how many mismatches there are in all.
    """
    problems: list[str] = []
    used: set[str] = set()
    mapped: dict[str, torch.Tensor] = {}
    for key, ours in module.state_dict().items():
        theirs = rename(key)
        if theirs is None:
            continue
        counter = key.endswith("num_batches_tracked")
        if theirs not in state:
            if not counter:
                problems.append(f"missing key {theirs} (the file has no such tensor)")
            continue
        used.add(theirs)
        value = state[theirs]
        if not isinstance(value, torch.Tensor):
            problems.append(f"key {theirs} is a {type(value).__name__}, not a tensor")
            continue
        linear = value.dim() == 2 and ours.dim() == 4 and value.shape[0] == ours.shape[0]
        if linear and value.numel() == ours.numel():  # a Linear layer as the convolution it is
            value = value.reshape(ours.shape)
        if value.shape != ours.shape:
            where = "the backbone" if theirs == key else f"the backbone's {key}"
            problems.append(
                f"key {theirs} has shape {tuple(value.shape)} in the file but "
                f"{tuple(ours.shape)} in {where}"
            )
            continue
        mapped[key] = value
    for theirs in state:
        if (
            theirs not in used
            and not dropped(theirs)
            and not theirs.endswith("num_batches_tracked")
        ):
            problems.append(f"unexpected key {theirs} (the backbone has no such tensor)")
    if problems:
        more = f" (the first of {len(problems)} mismatches)" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}")
    module.load_state_dict(mapped, strict=False)


#: torchvision's ImageNet weights that ``pretrained=True`` loads where they are not its DEFAULT:
#: MobileNetV2's original (V1) weights, those the CamVid recipe's figures were measured from.
TORCHVISION_WEIGHTS = {"mobilenet_v2": "IMAGENET1K_V1"}


def torchvision_state_dict(arch: str) -> tuple[dict[str, torch.Tensor], Path]:
    """torchvision's ImageNet weights of ``arch`` (its default, or ``TORCHVISION_WEIGHTS``'s),
    from the torch hub cache or the web, and the cached file they were read from."""
    from torchvision.models import get_model_weights

    weights = getattr(get_model_weights(arch), TORCHVISION_WEIGHTS.get(arch, "DEFAULT"))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=True, check_hash=True), cached
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad hash a RuntimeError
        raise UserError(
            f"could not download torchvision's ImageNet {arch} weights ({error_summary(err)}); "
            f"put {weights.url} at {cached}, or pass backbone.weights=PATH to a copy of it, or "
            f"train from scratch with backbone.pretrained=false"
        ) from err


@dataclass(frozen=True)
class WeightsFile:
    """What ``backbone.weights=PATH`` held.

    Attributes:
        state: the tensors, by the file's names (torchvision's, or with ``checkpoint`` the
            backbone's own, the ``backbone.`` prefix removed).
        checkpoint: the file is an fcnseg training checkpoint.
        sha256: the file's digest (hex).
    """

    state: dict[str, torch.Tensor]
    checkpoint: bool
    sha256: str


def read_weights_file(path: str | Path) -> WeightsFile:
    """A torchvision-format state dict saved with ``torch.save`` (or a ``{"state_dict": ...}``),
    or the backbone of an fcnseg training checkpoint (a dict whose ``model`` holds
    ``backbone.*`` tensors)."""
    what = f"backbone.weights={path}"
    state = load_weights_only(path, what=what)
    checkpoint = isinstance(state, dict) and isinstance(state.get("model"), dict)
    if checkpoint:
        state = {
            key[len(CHECKPOINT_PREFIX) :]: value
            for key, value in state["model"].items()
            if key.startswith(CHECKPOINT_PREFIX)
        }
        if not state:
            raise UserError(f"{what} is a checkpoint whose model has no backbone.* tensors")
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what} holds no state dict of tensors")
    return WeightsFile(state, checkpoint, file_sha256(path))


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()
