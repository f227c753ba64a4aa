"""Every option of every config group composes and instantiates."""

from pathlib import Path

import pytest
from conftest import CONFIGS, compose_config
from hydra.utils import instantiate

GROUPS = ["backbone", "head", "dataset", "optimizer", "scheduler", "trainer"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "dataset":
        overrides.append(f"dataset.root={Path('/data')}")
    cfg = compose_config(overrides)
    assert cfg[group] is not None
    # Everything except data roots resolves.
    if group != "dataset":
        from omegaconf import OmegaConf

        OmegaConf.to_container(cfg, resolve=True)


def test_default_composition_builds_every_part():
    cfg = compose_config()
    assert cfg.backbone._target_.endswith("vgg_tiny")
    assert cfg.head._target_.endswith("fcn8s")
    assert cfg.dataset.name == "synthetic"
    backbone = instantiate(cfg.backbone)
    head = instantiate(cfg.head)(backbone.feature_info, cfg.dataset.num_classes)
    assert head.score_fr.out_channels == cfg.dataset.num_classes == len(cfg.dataset.class_names)
    optimizer = instantiate(cfg.optimizer)(backbone.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer)
    assert scheduler.total_iters == cfg.trainer.max_iters


def test_documented_trainer_keys_exist():
    cfg = compose_config()
    for key in (
        "max_iters",
        "eval_interval",
        "batch_size",
        "num_workers",
        "device",
        "seed",
        "resume",
    ):
        assert key in cfg.trainer
    assert "pretrained" in cfg.backbone and "root" in cfg.dataset and "crop_size" in cfg.dataset
    assert "lr" in cfg.optimizer
