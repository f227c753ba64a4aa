"""The model description that checkpoints and exported models carry, and the only way a model
file is turned back into a network.

A model file is data from anyone (a model hub, a paper's repository), so nothing read from it is
imported or called: the description names the backbone and the head by their registered names
(``fcnseg.models.backbones.__all__`` and ``fcnseg.models.heads.__all__``, the allow-list), with
options that are plain values, and the classes, palette, ignore index and normalisation. It does
not depend on the configuration tree either, so renaming a config group or moving a class keeps
every file readable; a renamed builder keeps its old name in ``RENAMED``. ``describe`` writes it
for a network that ``fcnseg.models.builder.build_model`` built.

Versions:

- 1: ``{"version": 1, "backbone": {"name", "options"}, "head": {"name", "options"},
  "class_names", "palette", "ignore_index", "normalize"}``, under ``model_description`` in a
  checkpoint and in an ONNX file's metadata.
- 0: files without one (written before version 1): the training config's ``backbone`` and
  ``head`` nodes (``_target_: fcnseg.models.backbones.NAME`` and options) and ``dataset`` node,
  migrated by ``from_config``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fcnseg.errors import UserError
from fcnseg.models import backbones, heads

if TYPE_CHECKING:
    from torch import nn

VERSION = 1
#: the description's key in a checkpoint and in an exported model's metadata.
KEY = "model_description"
#: backbone and head names that were renamed since version 0: old name -> current name.
RENAMED: dict[str, str] = {}
#: options that say where weights come from: never read from a file (its weights follow).
WEIGHT_SOURCES = ("pretrained", "weights")


def registered(namespace: Any) -> dict[str, Any]:
    """The builders a namespace registers: the lower-case names of its ``__all__``."""
    return {name: getattr(namespace, name) for name in namespace.__all__ if name[0].islower()}


BACKBONES = registered(backbones)
HEADS = registered(heads)


@dataclass(frozen=True)
class ModelDescription:
    """What a trained network is, by registered names and plain values.

    Attributes:
        backbone: a name in ``BACKBONES`` (``vgg16``).
        head: a name in ``HEADS`` (``fcn8s``).
        class_names: one per output channel.
        backbone_options: the backbone builder's keyword arguments (no weight source).
        head_options: the head builder's keyword arguments.
        palette: one RGB colour per class, or ``None`` (the VOC map's).
        ignore_index: the label value of unlabelled pixels in training.
        normalize: the input normalisation's name (``imagenet``, ``caffe``, ``none``).
    """

    backbone: str
    head: str
    class_names: tuple[str, ...]
    backbone_options: Mapping[str, Any] = field(default_factory=dict)
    head_options: Mapping[str, Any] = field(default_factory=dict)
    palette: tuple[tuple[int, int, int], ...] | None = None
    ignore_index: int = 255
    normalize: str = "imagenet"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def create(
        cls,
        *,
        backbone: str,
        head: str,
        class_names: Sequence[str],
        backbone_options: Mapping[str, Any] | None = None,
        head_options: Mapping[str, Any] | None = None,
        palette: Any = None,
        ignore_index: int = 255,
        normalize: str = "imagenet",
        source: str = "the model description",
    ) -> ModelDescription:
        """A description with every field checked: registered names, plain option values,
        one class name per class.

        Raises:
            UserError: a name that is not registered, an option that is not a plain value, or
                a field of the wrong type; the message names ``source``, the key and the value.
        """
        backbone = RENAMED.get(str(backbone), str(backbone))
        head = RENAMED.get(str(head), str(head))
        for kind, name, known in (("backbone", backbone, BACKBONES), ("head", head, HEADS)):
            if name not in known:
                raise UserError(
                    f"{source}: {kind} {name!r} is not one of fcnseg's {kind}s "
                    f"({', '.join(known)}); nothing was loaded"
                )
        if isinstance(class_names, str | bytes) or not isinstance(class_names, Sequence):
            raise UserError(f"{source}: class_names={class_names!r} is not a list of names")
        try:
            colors = None
            if palette is not None:
                colors = tuple(tuple(int(c) for c in rgb) for rgb in palette)
                if any(len(rgb) != 3 for rgb in colors):
                    raise ValueError("a colour without 3 components")
            ignore = int(ignore_index)
        except (TypeError, ValueError) as err:
            raise UserError(f"{source}: palette or ignore_index unreadable ({err})") from err
        return cls(
            backbone=backbone,
            head=head,
            class_names=tuple(str(n) for n in class_names),
            backbone_options=_plain_options(backbone_options, f"{source}: backbone options"),
            head_options=_plain_options(head_options, f"{source}: head options"),
            palette=colors,
            ignore_index=ignore,
            normalize=str(normalize),
        )

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: Any, *, source: str) -> ModelDescription:
        """Reads a description of any version (``to_dict``'s, or a version 0 config)."""
        if not isinstance(data, Mapping):
            raise UserError(f"{source}: the model description is not a mapping")
        version = data.get("version")
        if version != VERSION:
            raise UserError(
                f"{source}: model description version {version!r} is not one this fcnseg "
                f"reads ({VERSION}); a newer fcnseg wrote it: upgrade fcnseg"
            )
        try:
            backbone, head = data["backbone"], data["head"]
            return cls.create(
                backbone=backbone["name"],
                head=head["name"],
                backbone_options=backbone.get("options"),
                head_options=head.get("options"),
                class_names=data["class_names"],
                palette=data.get("palette"),
                ignore_index=data.get("ignore_index", 255),
                normalize=data.get("normalize", "imagenet"),
                source=source,
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{source}: the model description lacks {err}") from err

    @classmethod
    def from_config(cls, config: Any, *, source: str) -> ModelDescription:
        """Migrates version 0: a training config's ``backbone``, ``head`` and ``dataset``.

        Only the last part of each ``_target_`` is read, as a registered name, and only under
        ``fcnseg.models.backbones.`` / ``fcnseg.models.heads.``; nothing is imported.
        """

        def builder(kind: str) -> tuple[str, dict[str, Any]]:
            node = config.get(kind)
            if not isinstance(node, Mapping):
                raise UserError(f"{source}: the config has no {kind} node")
            target = str(node.get("_target_", ""))
            prefix = f"fcnseg.models.{kind}s."
            if not target.startswith(prefix) or "." in target[len(prefix) :]:
                raise UserError(
                    f"{source}: {kind}._target_={target!r} is not one of fcnseg's {kind}s "
                    f"({prefix}NAME); nothing was loaded"
                )
            options = {k: v for k, v in node.items() if not str(k).startswith("_")}
            return target[len(prefix) :], options

        if not isinstance(config, Mapping):
            raise UserError(f"{source}: the training config is not a mapping")
        backbone, backbone_options = builder("backbone")
        head, head_options = builder("head")
        ds = config.get("dataset")
        if not isinstance(ds, Mapping) or "class_names" not in ds:
            raise UserError(f"{source}: the config's dataset node has no class_names")
        description = cls.create(
            backbone=backbone,
            head=head,
            backbone_options=backbone_options,
            head_options=head_options,
            class_names=ds["class_names"],
            palette=ds.get("palette"),
            ignore_index=ds.get("ignore_index", 255),
            normalize=ds.get("normalize", "imagenet"),
            source=source,
        )
        num_classes = ds.get("num_classes", description.num_classes)
        if num_classes != description.num_classes:
            raise UserError(
                f"{source}: dataset.num_classes={num_classes} but {description.num_classes} "
                f"class names"
            )
        return description

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], *, source: str) -> ModelDescription:
        """The description in a checkpoint: its own (version 1) or its config's (version 0)."""
        if KEY in ckpt:
            return cls.from_dict(ckpt[KEY], source=source)
        if isinstance(ckpt.get("config"), Mapping):
            return cls.from_config(ckpt["config"], source=source)
        raise UserError(
            f"{source} has no model description (no {KEY!r} or 'config' entry); it is not an "
            "fcnseg checkpoint"
        )

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], *, source: str) -> ModelDescription | None:
        """The description in an exported model's metadata, ``None`` where there is none."""
        try:
            if KEY in meta:
                return cls.from_dict(json.loads(meta[KEY]), source=source)
            if "config" in meta:
                return cls.from_config(json.loads(meta["config"]), source=source)
        except ValueError as err:  # json's errors
            raise UserError(f"{source}: the model description is not JSON ({err})") from err
        return None

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """The version 1 description: JSON-serialisable plain values."""
        return {
            "version": VERSION,
            "backbone": {"name": self.backbone, "options": dict(self.backbone_options)},
            "head": {"name": self.head, "options": dict(self.head_options)},
            "class_names": list(self.class_names),
            "palette": None if self.palette is None else [list(c) for c in self.palette],
            "ignore_index": self.ignore_index,
            "normalize": self.normalize,
        }


def describe(
    model: nn.Module,
    *,
    class_names: Sequence[str],
    palette: Any = None,
    ignore_index: int = 255,
    normalize: str = "imagenet",
) -> ModelDescription | None:
    """The ``ModelDescription`` of a model ``build_model`` built from registered builders (by
    name or as their partials), read from the ``architecture`` it records; ``None`` for any
    other network (it can be saved, not rebuilt)."""
    arch = getattr(model, "architecture", None)
    if arch is None:
        return None
    return ModelDescription.create(
        **arch,
        class_names=class_names,
        palette=palette,
        ignore_index=ignore_index,
        normalize=normalize,
        source="the model",
    )


def _plain_options(options: Any, what: str) -> dict[str, Any]:
    """``options`` as a dict of plain values (numbers, strings, booleans, ``None`` and lists of
    them), without the weight sources.

    Raises:
        UserError: a value that is none of those (a nested node, e.g. one with a ``_target_``).
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise UserError(f"{what} are not a mapping")
    plain = {}
    for key, value in options.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise UserError(f"{what}: {key!r} is not an option name")
        if key in WEIGHT_SOURCES:
            continue
        value = _plain(value)
        if value is _NOT_PLAIN:
            raise UserError(
                f"{what}: {key}={_short(options[key])} is not a plain value (number, string, "
                "boolean or list of them); nothing was loaded"
            )
        plain[key] = value
    return plain


_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _NOT_PLAIN
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    return _NOT_PLAIN


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
