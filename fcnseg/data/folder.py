"""Any dataset stored as a folder of images and a folder of label masks.

A mask has the image's name with the mask suffix (``.png`` by default) and holds one class index
per pixel (a palette or greyscale PNG: 0 .. num_classes-1, and ``ignore_index`` for pixels not
scored). Three layouts are recognised, tried in this order for split ``S``:

1. ``root/S/images/`` and ``root/S/masks/``;
2. ``root/images/S/`` and ``root/masks/S/``;
3. ``root/images/`` and ``root/masks/`` with ``root/S.txt`` listing the image names (one per
   line, with or without suffix, relative to ``images/``).

Images may sit in subfolders; the mask of ``images/a/b.jpg`` is ``masks/a/b.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fcnseg.data.base import FilePairDataset
from fcnseg.data.io import IMAGE_SUFFIXES
from fcnseg.errors import UserError
from fcnseg.utils.logging import get_logger


class SegmentationFolder(FilePairDataset):
    """Images and masks in folders, classes named in the config.

    Args:
        root: the dataset folder.
        split: the split's name (see the module docstring for where it is looked up).
        class_names: one name per class; their number must equal ``num_classes``.
        images, masks: the names of the image and mask folders.
        mask_suffix: the masks' file suffix.
        download: must be false (there is nothing to download).
        **kwargs: see ``SegmentationDataset``; with ``skip_corrupt`` an image without a mask
            is left out with a warning instead of stopping.
    """

    def __init__(
        self,
        *,
        root: str | Path | None,
        split: str = "train",
        class_names: Sequence[str] | None = None,
        images: str = "images",
        masks: str = "masks",
        mask_suffix: str = ".png",
        download: bool = False,
        **kwargs,
    ) -> None:
        if download:
            raise UserError("dataset.download=true: a folder dataset has nothing to download")
        if root is None:
            raise UserError(
                f"dataset.root is not set: pass dataset.root=DIR, the folder holding {images}/ "
                f"and {masks}/"
            )
        if class_names is not None:
            kwargs.setdefault("num_classes", len(class_names))
            if kwargs["num_classes"] != len(class_names):
                raise UserError(
                    f"dataset.num_classes={kwargs['num_classes']} but dataset.class_names "
                    f"lists {len(class_names)} classes"
                )
        if "num_classes" not in kwargs:
            raise UserError("dataset.class_names (or dataset.num_classes) must be set")
        self.class_names = tuple(class_names) if class_names is not None else None
        self.root, self.split = Path(root).expanduser(), split
        image_dir, mask_dir, listing = self._find_layout(images, masks)
        if listing is None:
            image_files = sorted(
                p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            image_files = [
                self._listed(image_dir, name, listing) for name in listing.read_text().split()
            ]
        if not image_files:
            raise UserError(f"{listing or image_dir} lists no images ({', '.join(IMAGE_SUFFIXES)})")
        mask_files = [
            (mask_dir / p.relative_to(image_dir)).with_suffix(mask_suffix) for p in image_files
        ]
        missing = [m for m in mask_files if not m.is_file()]
        if missing:
            message = (
                f"{len(missing)} of the {len(image_files)} images of {image_dir} have no mask in "
                f"{mask_dir}, e.g. {missing[0]}"
            )
            if not kwargs.get("skip_corrupt", False):
                raise UserError(message)
            get_logger().warning("dataset.skip_corrupt: %s; those images are left out", message)
            kept = [(i, m) for i, m in zip(image_files, mask_files) if m.is_file()]
            image_files, mask_files = [i for i, _ in kept], [m for _, m in kept]
        super().__init__(images=image_files, labels=mask_files, **kwargs)

    def _find_layout(self, images: str, masks: str) -> tuple[Path, Path, Path | None]:
        root, split = self.root, self.split
        if (root / split / images).is_dir() and (root / split / masks).is_dir():
            return root / split / images, root / split / masks, None
        if (root / images / split).is_dir() and (root / masks / split).is_dir():
            return root / images / split, root / masks / split, None
        if (root / images).is_dir() and (root / masks).is_dir():
            listing = root / f"{split}.txt"
            if listing.is_file():
                return root / images, root / masks, listing
            raise UserError(
                f"split file {listing} does not exist; expected {root}/{split}/{images}/ and "
                f"{root}/{split}/{masks}/, or {root}/{images}/{split}/ and "
                f"{root}/{masks}/{split}/, or {root}/{images}/ and {root}/{masks}/ with "
                f"{split}.txt listing the image names"
            )
        raise UserError(
            f"dataset.root={root} holds no {images}/ and {masks}/ folders; expected "
            f"{root}/{split}/{images}/ and {root}/{split}/{masks}/, or {root}/{images}/{split}/ "
            f"and {root}/{masks}/{split}/, or {root}/{images}/ and {root}/{masks}/ with "
            f"{split}.txt listing the image names"
        )

    @staticmethod
    def _listed(image_dir: Path, name: str, listing: Path) -> Path:
        path = image_dir / name
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return path
        for suffix in IMAGE_SUFFIXES:
            if path.with_name(path.name + suffix).is_file():
                return path.with_name(path.name + suffix)
        raise UserError(f"{listing} lists {name!r}, but {image_dir} holds no image of that name")
