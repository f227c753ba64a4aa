"""Inspect a dataset split: ``python scripts/inspect_data.py dataset=voc dataset.root=DIR``.

Prints pixel counts per class, ignored pixels, image sizes and every problem found (an empty
split, label values out of range, unreadable files, size mismatches) with a file each;
``out=FILE`` writes them as JSON, ``vis=DIR`` writes image | label | overlay pictures
(configs/inspect_data.yaml). Exits with status 1 when it found a problem, after reporting.
"""

import json
import sys
from pathlib import Path

import hydra
from fcnseg_cli.scripts import reports_config_errors
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from fcnseg.data.inspection import format_report, inspect_dataset, problems, write_overlays
from fcnseg.utils.cli import user_errors
from fcnseg.utils.logging import setup_logging
from fcnseg.utils.outputs import check_output_dir, check_output_file


@reports_config_errors
@hydra.main(version_base="1.3", config_path="../configs", config_name="inspect_data")
def main(cfg: DictConfig) -> None:
    with user_errors("inspect_data.py", also=(InstantiationException,)):
        setup_logging()
        ds = cfg.dataset
        split = cfg.split or ds.val_split
        dataset = instantiate(ds.builder)(split=split, transform=None)
        # Checked before the pass over the data: the report never goes among the dataset's files.
        folders = dataset.data_folders()
        if cfg.out:
            check_output_file(cfg.out, key="out", protected=folders)
        if cfg.vis:
            check_output_dir(cfg.vis, key="vis", protected=folders, overwrite=True)
        class_names = list(ds.class_names)
        stats = inspect_dataset(
            dataset, class_names=class_names, ignore_index=ds.ignore_index,
            num_workers=cfg.num_workers, max_samples=cfg.max_samples,
        )  # fmt: skip
        stats = {"dataset": ds.name, "split": split, **stats}
        print(f"{ds.name} {split}: {format_report(stats)}")
        if cfg.out:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.out).write_text(json.dumps(stats, indent=2))
            print(f"statistics written to {cfg.out}")
        if cfg.vis:
            written = write_overlays(
                dataset, cfg.vis, class_names=class_names, num=cfg.num_vis,
                colors=ds.get("palette"), ignore_index=ds.ignore_index,
            )  # fmt: skip
            print(f"{len(written)} overlays written to {cfg.vis}")
    if problems(stats):
        sys.exit(1)  # after the report: scripts and CI can stop on a dataset with problems


if __name__ == "__main__":
    main()
