"""Each setting's default is defined once: TrainSettings has none of its own, trainer/default.yaml
holds the training switches and the dataset's recipe the length, batch and intervals; what a
preset resolves to follows from the files in their documented order (docs/configs.md).

Composition only: no model is built and nothing is trained.
"""

from __future__ import annotations

import dataclasses

import pytest
from conftest import CONFIGS, NOT_SETTINGS, compose_config, run_script, train_settings
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fcnseg.engine.settings import TrainSettings
from fcnseg.errors import UserError

TRAINER = OmegaConf.to_container(OmegaConf.load(CONFIGS / "trainer" / "default.yaml"))
RECIPES = sorted(p.stem for p in (CONFIGS / "recipe").glob("*.yaml"))
PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))

#: The commands docs/configs.md, docs/recipes.md and the README resolve.
COMMANDS = [
    [],
    ["backbone=vgg16"],
    ["head=segnet", "backbone=vgg_tiny_encoder"],
    ["backbone=vgg16", "head=fcn8s", "dataset=voc_aug"],
    *[[f"dataset={p.stem}"] for p in sorted((CONFIGS / "dataset").glob("*.yaml"))],
    *[[f"experiment={preset}"] for preset in PRESETS],
]


def test_train_settings_have_no_defaults():
    for field in dataclasses.fields(TrainSettings):
        assert field.default is dataclasses.MISSING, field.name
        assert field.default_factory is dataclasses.MISSING, field.name


def test_trainer_yaml_keys_are_the_settings():
    assert TRAINER["_target_"] == "fcnseg.engine.settings.TrainSettings"
    assert sorted(k for k in TRAINER if k not in NOT_SETTINGS) == sorted(TrainSettings.keys())
    # The trainer's hooks: none besides its own, and no averaged weights.
    assert TRAINER["hooks"] == [] and TRAINER["ema"] == {"decay": None}


def test_a_default_is_either_the_yaml_or_every_recipe():
    """A null key of trainer/default.yaml is set by every recipe; a key with a value is set by
    no recipe (a value every recipe replaces would be a default no run sees)."""
    by_recipe = {
        name: OmegaConf.to_container(OmegaConf.load(CONFIGS / "recipe" / f"{name}.yaml"))
        for name in RECIPES
    }
    for key, value in TRAINER.items():
        setters = [name for name, cfg in by_recipe.items() if key in cfg.get("trainer", {})]
        assert setters == (RECIPES if value is None else []), key


def test_the_tests_settings_are_what_train_composes():
    """tests' ``train_settings()`` is the quickstart's TrainSettings, as train.py builds it."""
    node = compose_config().trainer
    composed = instantiate(
        OmegaConf.masked_copy(node, [k for k in node if k not in ("hooks", "ema")])
    )
    assert composed == train_settings()
    assert train_settings(batch_size=3).batch_size == 3


@pytest.mark.parametrize("key", [k for k, v in TRAINER.items() if v is None])
def test_a_length_no_recipe_sets_is_one_sentence(key):
    with pytest.raises(UserError, match=rf"^trainer\.{key} is not set: the dataset's recipe"):
        train_settings(**{key: None})


def test_a_bad_setting_is_one_sentence_and_status_2(tmp_path):
    proc = run_script("train.py", "trainer.batch_size=abc", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "train.py: error: trainer.batch_size='abc' is not a whole number"
    ]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written


def _load(group: str, name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{name}.yaml"))


def _preset_chain(name: str) -> list[dict]:
    """A preset's files, its base presets first (they come before it in its defaults list)."""
    cfg = _load("experiment", name)
    bases = [e for e in cfg.get("defaults", []) if isinstance(e, str) and e != "_self_"]
    return [layer for base in bases for layer in _preset_chain(base)] + [cfg]


def _choice(layers: list[dict], group: str, default: str) -> str:
    chosen = default
    for layer in layers:
        for entry in layer.get("defaults", []):
            if isinstance(entry, dict):
                for key, value in entry.items():
                    if key.split()[-1].lstrip("/") == group:
                        chosen = value
    return chosen


def _expected(overrides: list[str]) -> dict:
    """What the layering of docs/configs.md gives, read here from the files themselves: the
    groups' own files, then the dataset's recipe, then the preset (its bases first), then the
    command line; None where the last layer that sets a key leaves it to an interpolation."""
    args = dict(o.split("=", 1) for o in overrides)
    preset = _preset_chain(args["experiment"]) if "experiment" in args else []
    dataset = args.get("dataset") or _choice(preset, "dataset", "synthetic")
    recipe = _load("recipe", dataset)
    optimizer = args.get("optimizer") or _choice([recipe, *preset], "optimizer", "")
    groups = {"trainer": TRAINER, "dataset": _load("dataset", dataset)}
    groups["optimizer"] = _load("optimizer", optimizer)
    keys = {"batch_size": ("trainer", "batch_size"), "max_iters": ("trainer", "max_iters"),
            "eval_interval": ("trainer", "eval_interval"), "lr": ("optimizer", "lr"),
            "crop_size": ("dataset", "crop_size")}  # fmt: skip
    expected = {}
    for name, (node, key) in keys.items():
        value = groups[node][key]
        for layer in [recipe, *preset]:
            value = layer.get(node, {}).get(key, value)
        if f"{node}.{key}" in args:
            value = OmegaConf.create(f"v: {args[f'{node}.{key}']}").v
        expected[name] = None if isinstance(value, str) and "${" in value else value
    return expected


@pytest.mark.parametrize("overrides", COMMANDS, ids=lambda o: " ".join(o) or "quickstart")
def test_documented_commands_resolve_to_their_layers(overrides):
    cfg = compose_config(overrides)
    resolved = {
        "batch_size": cfg.trainer.batch_size, "max_iters": cfg.trainer.max_iters,
        "eval_interval": cfg.trainer.eval_interval, "lr": cfg.optimizer.lr,
        "crop_size": OmegaConf.to_container(cfg.dataset)["crop_size"],
    }  # fmt: skip
    expected = _expected(overrides)
    if expected["lr"] is None:  # the synthetic recipe's rate for the backbone's pretraining
        table = _load("recipe", "synthetic")["recipe"]["lr_if_pretrained"]
        expected["lr"] = table[str(cfg.backbone.pretrained)]
    assert resolved == expected
    trainer = [resolved[k] for k in ("batch_size", "max_iters", "eval_interval")]
    assert None not in trainer  # every length and batch set by a recipe or a preset
    TrainSettings(**{k: v for k, v in cfg.trainer.items() if k not in NOT_SETTINGS})


def test_command_line_wins_over_preset_and_recipe():
    overrides = ["experiment=camvid_cpu", "trainer.batch_size=2", "optimizer.lr=0.5"]
    cfg = compose_config(overrides)
    assert _expected(overrides) == {
        "batch_size": 2, "max_iters": cfg.trainer.max_iters, "lr": 0.5,
        "eval_interval": cfg.trainer.eval_interval, "crop_size": cfg.dataset.crop_size,
    }  # fmt: skip
    assert (cfg.trainer.batch_size, cfg.optimizer.lr) == (2, 0.5)


# The quickstart and the CPU presets as docs/configs.md and the README publish them: the batch
# of 8 and the rates measured there, not read from the files under test.
PUBLISHED = {
    (): (16, 1e-2, 1000, 64),
    ("backbone=vgg16",): (16, 1e-4, 1000, 64),
    ("experiment=camvid_cpu",): (8, 2.5e-3, 3600, 224),
    ("experiment=camvid_mobilenet_cpu",): (8, 1e-3, 1200, 224),
    ("experiment=voc_fcn8s",): (1, 1e-14, 100_000, None),
    ("head=segnet", "backbone=vgg_tiny_encoder"): (16, 1e-2, 1000, 64),
}


@pytest.mark.parametrize("overrides", list(PUBLISHED), ids=lambda o: " ".join(o) or "quickstart")
def test_documented_commands_keep_their_published_values(overrides):
    cfg = compose_config(list(overrides))
    crop = OmegaConf.to_container(cfg.dataset)["crop_size"]
    values = (cfg.trainer.batch_size, cfg.optimizer.lr, cfg.trainer.max_iters, crop)
    assert values == PUBLISHED[overrides]
