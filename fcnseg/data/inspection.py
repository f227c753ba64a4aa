"""Looking at a dataset before training on it: pixel statistics, problems, overlays.

Statistics are taken on the label maps as the model sees them at evaluation time (after the
dataset's own mapping, e.g. Cityscapes label IDs to train IDs; at full resolution, nothing
augmented), and every problem is reported with a file rather than raised, so one pass lists
them all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fcnseg.data.base import SegmentationDataset, label_counts
from fcnseg.data.loader import stop_workers
from fcnseg.errors import UserError
from fcnseg.utils.logging import progress


class _SampleStats(Dataset):
    """Per-sample statistics, computed in loader workers."""

    def __init__(self, dataset: SegmentationDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        ds, i = self.dataset, self.indices[k]
        out: dict[str, Any] = {
            "index": i,
            "file": ds.describe(i),
            "label_file": ds.describe_label(i),
        }
        try:
            image, label = ds.load(i)
        except UserError as err:  # CorruptFileError, a colour label...
            out["error"] = str(err)
            return out
        out["size"] = tuple(int(s) for s in image.shape[:2])
        out["label_size"] = tuple(int(s) for s in label.shape[:2])
        out["values"], out["counts"] = label_counts(label)
        return out


def _as_is(sample: dict[str, Any]) -> dict[str, Any]:
    return sample


def inspect_dataset(
    dataset: SegmentationDataset,
    *,
    class_names: Sequence[str],
    ignore_index: int = 255,
    num_workers: int = 0,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Pixel and size statistics of ``dataset``, and every problem found, with a file each.

    Args:
        dataset: a dataset whose ``load(i)`` gives (image, label) as the model sees them.
        class_names: one per class.
        ignore_index: the label value that is not scored.
        num_workers: loader processes reading the samples.
        max_samples: inspect only the first this many samples.

    Returns:
        ``num_samples``, ``class_pixels`` and ``class_images`` (pixels of, and samples
        containing, each class), ``ignored_pixels``, ``total_pixels``, ``image_sizes``
        (``WxH`` -> count, most frequent first, plus min/max/mean ``height`` and ``width``),
        ``out_of_range`` (each label value that is neither a class nor ``ignore_index`` ->
        pixels, samples and one file holding it), ``unreadable`` and ``size_mismatches``
        (lists of files).
    """
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    num_classes = len(class_names)
    class_pixels = np.zeros(num_classes, np.int64)
    class_images = np.zeros(num_classes, np.int64)
    ignored = total = 0
    sizes: Counter[tuple[int, int]] = Counter()
    out_of_range: dict[int, dict[str, Any]] = {}
    unreadable, mismatches = [], []
    loader = DataLoader(
        _SampleStats(dataset, range(n)), batch_size=None, num_workers=num_workers, collate_fn=_as_is
    )
    samples = iter(loader)
    try:
        for s in progress(samples, total=n, desc="inspect"):
            if "error" in s:
                unreadable.append({"file": s["file"], "error": s["error"]})
                continue
            sizes[s["size"]] += 1
            if s["size"] != s["label_size"]:
                (h, w), (lh, lw) = s["size"], s["label_size"]
                mismatches.append({"file": s["file"], "image": f"{w}x{h}", "label": f"{lw}x{lh}"})
            values, counts = np.asarray(s["values"]), np.asarray(s["counts"])
            total += int(counts.sum())
            for v, c in zip(values.tolist(), counts.tolist()):
                if 0 <= v < num_classes:
                    class_pixels[v] += c
                    class_images[v] += 1
                elif v == ignore_index:
                    ignored += c
                else:
                    entry = out_of_range.setdefault(
                        v, {"pixels": 0, "samples": 0, "file": s["label_file"]}
                    )
                    entry["pixels"] += c
                    entry["samples"] += 1
    finally:
        stop_workers(samples)
    heights = np.array([h for (h, _), k in sizes.items() for _ in range(k)], dtype=np.int64)
    widths = np.array([w for (_, w), k in sizes.items() for _ in range(k)], dtype=np.int64)

    def summary(x: np.ndarray) -> dict[str, float]:
        if not x.size:
            return {"min": 0, "max": 0, "mean": 0.0}
        return {"min": int(x.min()), "max": int(x.max()), "mean": round(float(x.mean()), 2)}

    return {
        "num_samples": n,
        "num_classes": num_classes,
        "ignore_index": ignore_index,
        "class_pixels": dict(zip(class_names, class_pixels.tolist())),
        "class_images": dict(zip(class_names, class_images.tolist())),
        "ignored_pixels": ignored,
        "total_pixels": total,
        "image_sizes": {
            "count": {f"{w}x{h}": k for (h, w), k in sizes.most_common()},
            "height": summary(heights),
            "width": summary(widths),
        },
        "out_of_range": {str(v): out_of_range[v] for v in sorted(out_of_range)},
        "unreadable": unreadable,
        "size_mismatches": mismatches,
    }


def format_report(stats: dict[str, Any], *, max_sizes: int = 8) -> str:
    """``inspect_dataset``'s result as a few readable lines and a table."""
    total = max(stats["total_pixels"], 1)
    lines = [f"{stats['num_samples']} samples, {stats['total_pixels']} label pixels"]
    width = max([len(name) for name in stats["class_pixels"]] + [7])
    lines.append(f"{'class':<{width}}  {'pixels':>12}  {'share':>7}  {'images':>7}")
    for name, pixels in stats["class_pixels"].items():
        share = 100 * pixels / total
        lines.append(
            f"{name:<{width}}  {pixels:>12}  {share:>6.2f}%  {stats['class_images'][name]:>7}"
        )
    ignored = stats["ignored_pixels"]
    lines.append(f"{'ignored':<{width}}  {ignored:>12}  {100 * ignored / total:>6.2f}%")
    sizes = stats["image_sizes"]
    common = ", ".join(f"{s} ({k})" for s, k in list(sizes["count"].items())[:max_sizes])
    more = len(sizes["count"]) - max_sizes
    lines.append(f"image sizes (WxH): {common}" + (f" and {more} more" if more > 0 else ""))
    h, w = sizes["height"], sizes["width"]
    lines.append(
        f"height {h['min']}-{h['max']} (mean {h['mean']}), "
        f"width {w['min']}-{w['max']} (mean {w['mean']})"
    )
    found = problems(stats)
    lines += found
    lines.append(f"{len(found)} problem(s) found" if found else "no problems found")
    return "\n".join(lines)


def problems(stats: dict[str, Any]) -> list[str]:
    """Every problem in ``inspect_dataset``'s result, one line each: an empty split, label
    values that are neither a class nor the ignore index, unreadable files, size mismatches."""
    lines = []
    if stats["num_samples"] == 0:
        lines.append("the split has no samples: nothing to train or evaluate on")
    for value, entry in stats["out_of_range"].items():
        lines.append(
            f"label value {value} is neither a class nor the ignore index {stats['ignore_index']}: "
            f"{entry['pixels']} pixels in {entry['samples']} samples, e.g. {entry['file']}"
        )
    for entry in stats["unreadable"]:
        lines.append(f"unreadable: {entry['error']}")
    for entry in stats["size_mismatches"]:
        lines.append(
            f"size mismatch: {entry['file']}: image {entry['image']}, label {entry['label']}"
        )
    return lines


def write_overlays(
    dataset: SegmentationDataset,
    out_dir: str | Path,
    *,
    class_names: Sequence[str],
    num: int = 8,
    colors: Any = None,
    ignore_index: int = 255,
) -> list[Path]:
    """Writes ``num`` samples, evenly spaced over the dataset, as PNGs of
    image | label colours (ignored pixels in VOC's cream) | overlay with a legend."""
    from fcnseg.utils.visualize import full_palette, overlay

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = full_palette(colors)
    indices = np.unique(
        np.linspace(0, len(dataset) - 1, num=min(num, len(dataset))).round().astype(int)
    )
    written = []
    for i in indices.tolist():
        try:
            image, label = dataset.load(i)
        except UserError:
            continue  # reported by inspect_dataset
        if image.shape[:2] != label.shape[:2]:
            continue
        colours = table[label.astype(np.int64) % 256]
        blended = overlay(
            image, label, class_names=class_names, colors=colors, ignore_index=ignore_index
        )
        h = max(image.shape[0], blended.shape[0])
        panels = [
            np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255)
            for p in (image, colours, blended)
        ]
        source = getattr(dataset, "image_path", None)
        stem = Path(source(i)).stem if callable(source) else "sample"
        path = out / f"{i:06d}_{stem}.png"
        Image.fromarray(np.concatenate(panels, axis=1).astype(np.uint8)).save(path)
        written.append(path)
    return written
