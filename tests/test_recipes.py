"""Training recipes (configs/recipe/, docs/recipes.md): the dataset picks one, the backbone's
pretraining (backbone.pretrained) picks the learning rate of the quickstart's, presets and the
command line win.

Composition only: no model is built and nothing is trained.
"""

import pytest
import torch
from conftest import CONFIGS
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

DATASETS = sorted(p.stem for p in (CONFIGS / "dataset").glob("*.yaml"))
REAL_DATASETS = [d for d in DATASETS if d != "synthetic"]
PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
BACKBONES = sorted(p.stem for p in (CONFIGS / "backbone").glob("*.yaml"))
# The backbones without pretrained weights (docs/recipes.md): the quickstart's, from scratch.
FROM_SCRATCH = ["vgg_tiny", "vgg_tiny_encoder"]

# What docs/recipes.md documents: optimizer, scheduler, lr, momentum, weight decay, iterations,
# batch, crop.
RECIPES = {
    "voc": ("sgd", "poly", 0.01, 0.9, 5e-4, 20_000, 16, 512),
    "voc_aug": ("sgd", "poly", 0.01, 0.9, 5e-4, 20_000, 16, 512),
    "sbd": ("sgd", "poly", 0.01, 0.9, 5e-4, 20_000, 16, 512),
    "cityscapes": ("sgd", "poly", 0.01, 0.9, 5e-4, 40_000, 8, [512, 1024]),
    "coco": ("sgd", "poly", 0.02, 0.9, 1e-4, 110_880, 32, 480),
    "camvid": ("sgd", "constant", 1e-3, 0.9, 5e-4, 40_000, 4, None),
    "folder": ("sgd", "poly", 0.01, 0.9, 5e-4, 20_000, 16, 512),
}

# Every preset as it composed before recipes existed: optimizer, scheduler, lr, momentum,
# weight decay, iterations, batch, crop, eval and checkpoint intervals.
PRESET_VALUES = {
    "voc_fcn32s": ("sgd", "constant", 1e-10, 0.99, 5e-4, 100_000, 1, None, 4000, 4000),
    "voc_fcn16s": ("sgd", "constant", 1e-12, 0.99, 5e-4, 100_000, 1, None, 4000, 4000),
    "voc_fcn8s": ("sgd", "constant", 1e-14, 0.99, 5e-4, 100_000, 1, None, 4000, 4000),
    "voc_fcn8s_atonce": ("sgd", "constant", 1e-10, 0.99, 5e-4, 300_000, 1, None, 4000, 4000),
    "voc_fcn8s_modern": ("sgd", "poly", 1e-3, 0.9, 5e-4, 30_000, 8, 480, 2000, 1000),
    "cityscapes_fcn8s": ("sgd", "poly", 1e-3, 0.9, 5e-4, 40_000, 8, [512, 1024], 4000, 1000),
    "segnet_camvid": ("sgd", "constant", 1e-3, 0.9, 5e-4, 40_000, 4, None, 2000, 1000),
    "camvid_cpu": ("adamw", "poly", 2.5e-3, None, 1e-4, 3600, 8, 224, 3600, 500),
    "camvid_mobilenet_cpu": ("adamw", "poly", 1e-3, None, 1e-4, 1200, 8, 224, 1200, 500),
}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _leaves(node, prefix: str = "") -> set[str]:
    """The dotted keys of a config's values (its defaults list left out)."""
    keys = set()
    for key, value in node.items():
        if key == "defaults":
            continue
        path = f"{prefix}{key}"
        keys |= _leaves(value, f"{path}.") if isinstance(value, dict) else {path}
    return keys


def _file_keys(path) -> set[str]:
    """The keys a config file sets, with those of the configs its defaults list includes by
    path (a preset's base preset)."""
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    keys = _leaves(cfg)
    for entry in cfg.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            keys |= _file_keys(path.parent / f"{entry}.yaml")
    return keys


def test_bare_command_is_the_quickstart():
    cfg = _compose([])
    choices = cfg.hydra.runtime.choices
    assert (choices["backbone"], choices["dataset"], choices["recipe"]) == (
        "vgg_tiny", "synthetic", "synthetic",
    )  # fmt: skip
    assert not cfg.backbone.pretrained
    assert OmegaConf.to_container(cfg.optimizer, resolve=True) == {
        "_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2, "weight_decay": 1e-4,
        "fused": True,
    }  # fmt: skip
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.PolynomialLR"
    assert cfg.scheduler.power == 0.9 and cfg.scheduler.total_iters == 1000
    assert (cfg.trainer.max_iters, cfg.trainer.batch_size, cfg.trainer.eval_interval) == (
        1000, 16, 500,
    )  # fmt: skip
    assert cfg.dataset.crop_size == 64 and cfg.loss.class_weights is None


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_has_a_recipe(dataset):
    assert (CONFIGS / "recipe" / f"{dataset}.yaml").is_file()
    assert _compose([f"dataset={dataset}"]).hydra.runtime.choices["recipe"] == dataset


def test_every_real_dataset_is_documented_here():
    assert sorted(RECIPES) == REAL_DATASETS


@pytest.mark.parametrize("dataset", REAL_DATASETS)
def test_real_dataset_gets_its_published_recipe(dataset):
    optimizer, scheduler, lr, momentum, weight_decay, iters, batch, crop = RECIPES[dataset]
    cfg = _compose([f"dataset={dataset}", "backbone=vgg16", "head=fcn8s"])
    choices = cfg.hydra.runtime.choices
    assert (choices["optimizer"], choices["scheduler"]) == (optimizer, scheduler)
    assert cfg.optimizer._target_ == "torch.optim.SGD"  # never AdamW at the quickstart's 1e-2
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (
        lr, momentum, weight_decay,
    )  # fmt: skip
    assert (cfg.trainer.max_iters, cfg.trainer.batch_size) == (iters, batch)
    assert OmegaConf.to_container(cfg.dataset, resolve=False)["crop_size"] == crop
    assert cfg.trainer.eval_interval <= iters and iters % cfg.trainer.checkpoint_interval == 0
    # The schedule's length follows the recipe's.
    assert cfg.scheduler.get("total_iters") in (iters, 0)


@pytest.mark.parametrize("dataset", DATASETS)
def test_recipe_builds_its_optimizer_and_scheduler(dataset):
    """Every key a recipe sets is one its optimizer and scheduler accept."""
    cfg = _compose([f"dataset={dataset}"])
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = instantiate(cfg.optimizer)(params)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    assert scheduler.last_epoch == 0


@pytest.mark.parametrize("backbone", BACKBONES)
def test_pretrained_backbones_fine_tune_on_the_quickstart_dataset(backbone):
    """Only the backbones trained from scratch get the quickstart's AdamW 1e-2."""
    cfg = _compose([f"backbone={backbone}"])
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    if backbone in FROM_SCRATCH:
        assert not cfg.backbone.pretrained and cfg.optimizer.lr == 1e-2
    else:
        assert cfg.backbone.pretrained and cfg.optimizer.lr == 1e-4
    # The rate follows the weights the backbone starts from, whatever its name.
    flipped = _compose([f"backbone={backbone}", f"backbone.pretrained={backbone in FROM_SCRATCH}"])
    assert flipped.optimizer.lr == (1e-4 if backbone in FROM_SCRATCH else 1e-2)


def test_from_scratch_backbones_are_the_untrained_ones():
    untrained = [b for b in BACKBONES if not _compose([f"backbone={b}"]).backbone.pretrained]
    assert untrained == FROM_SCRATCH


def test_vgg16_fcn8s_on_synthetic_fine_tunes():
    cfg = _compose(["backbone=vgg16", "head=fcn8s"])
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.lr == 1e-4
    assert cfg.trainer.max_iters == 1000 and cfg.trainer.batch_size == 16


def test_command_line_wins_over_the_recipe():
    cfg = _compose(
        ["dataset=voc_aug", "optimizer.lr=1e-3", "trainer.max_iters=500",
         "trainer.batch_size=4", "dataset.crop_size=320", "scheduler=constant"]
    )  # fmt: skip
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.momentum == 0.9
    assert (cfg.trainer.max_iters, cfg.trainer.batch_size, cfg.dataset.crop_size) == (500, 4, 320)
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.ConstantLR"
    # Another recipe, or another optimizer with its own settings.
    assert _compose(["recipe=voc_aug"]).trainer.max_iters == 20_000
    # The recipes set only what every optimizer takes (lr, weight decay): switching needs no more.
    adamw = _compose(["dataset=coco", "optimizer=adamw", "optimizer.lr=1e-4"]).optimizer
    assert (adamw._target_, adamw.lr, adamw.weight_decay) == ("torch.optim.AdamW", 1e-4, 1e-4)
    assert "momentum" not in adamw


@pytest.mark.parametrize("on_synthetic", [False, True], ids=["own-dataset", "synthetic"])
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_as_before(preset, on_synthetic):
    assert sorted(PRESET_VALUES) == PRESETS
    cfg = _compose([f"experiment={preset}"] + (["dataset=synthetic"] if on_synthetic else []))
    choices = cfg.hydra.runtime.choices
    optimizer, scheduler, lr, momentum, wd, iters, batch, crop, every, save = PRESET_VALUES[preset]
    assert (choices["optimizer"], choices["scheduler"]) == (optimizer, scheduler)
    assert (cfg.optimizer.lr, cfg.optimizer.get("momentum"), cfg.optimizer.weight_decay) == (
        lr, momentum, wd,
    )  # fmt: skip
    assert (cfg.trainer.max_iters, cfg.trainer.batch_size) == (iters, batch)
    assert OmegaConf.to_container(cfg.dataset)["crop_size"] == crop
    assert (cfg.trainer.eval_interval, cfg.trainer.checkpoint_interval) == (every, save)
    weighted = {
        "segnet_camvid": ("median_frequency", 1.0),
        "camvid_cpu": ("median_frequency", 0.5),
        "camvid_mobilenet_cpu": ("median_frequency", 0.5),
    }
    assert (cfg.loss.class_weights, cfg.loss.class_weight_power) == weighted.get(
        preset, (None, 1.0)
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_sets_every_key_its_recipes_set(preset):
    """A recipe never leaks into a preset: the preset sets every key of its dataset's recipe
    (and of the synthetic one, which the tests run presets on) but the synthetic recipe's table
    of rates, which only its own optimizer.lr reads."""
    cfg = _compose([f"experiment={preset}"])
    preset_keys = _file_keys(CONFIGS / "experiment" / f"{preset}.yaml")
    recipe_keys = _file_keys(CONFIGS / "recipe" / f"{cfg.hydra.runtime.choices['dataset']}.yaml")
    recipe_keys |= _file_keys(CONFIGS / "recipe" / "synthetic.yaml")
    recipe_keys = {key for key in recipe_keys if not key.startswith("recipe.")}
    assert recipe_keys <= preset_keys, sorted(recipe_keys - preset_keys)
