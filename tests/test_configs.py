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
    backbone = instantiate(cfg.backbone)()  # a _partial_: build_model completes it for the head
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


@pytest.mark.parametrize("option", options("backbone"))
def test_backbone_configs_are_partial_builders_of_fcnseg_backbones(option):
    """The head completes the backbone (build_model passes what it asks for), so every backbone
    config is a ``_partial_`` of a builder in fcnseg.models.backbones."""
    node = compose_config([f"backbone={option}"]).backbone
    assert node._partial_ is True
    assert node._target_ == f"fcnseg.models.backbones.{node._target_.rsplit('.', 1)[1]}"
    assert "pretrained" in node and "weights" in node


@pytest.mark.parametrize("option", options("head"))
def test_head_configs_describe_the_head_alone(option):
    """No head config reaches into another group (no ``@package _global_``, no defaults)."""
    text = (CONFIGS / "head" / f"{option}.yaml").read_text()
    assert "@package" not in text and "defaults:" not in text
    assert compose_config([f"head={option}"]).backbone == compose_config().backbone
