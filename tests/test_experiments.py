"""Experiment presets: the paper's recipe as configured, and every preset runs on synthetic data.

The runs call scripts/train.py's ``main`` in this process with the composed config (the way
``@hydra.main`` would, minus the process start), on the synthetic dataset and with each
preset's backbone swapped for its tiny counterpart.
"""

import copy
import importlib.util
import json

import pytest
import torch
from conftest import CONFIGS, ROOT, TINY_RUN
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from torch import nn

from fcnseg.engine.optim import with_param_groups

PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
PAPER = {  # the reference solver.prototxt of each net
    "voc_fcn32s": ("fcn32s", 1e-10, 100_000, None),
    "voc_fcn16s": ("fcn16s", 1e-12, 100_000, "outputs/voc_fcn32s/checkpoints/last.pt"),
    "voc_fcn8s": ("fcn8s", 1e-14, 100_000, "outputs/voc_fcn16s/checkpoints/last.pt"),
    "voc_fcn8s_atonce": ("fcn8s_atonce", 1e-10, 300_000, None),
}
TINY = {
    "vgg16": "vgg_tiny",
    "vgg16_bn": "vgg_tiny",
    "vgg19": "vgg_tiny",
    "vgg16_encoder": "vgg_tiny_encoder",
    "vgg16_bn_encoder": "vgg_tiny_encoder",
}
# The synthetic dataset in place of the preset's, with its own splits and small crops.
ON_SYNTHETIC = [
    "dataset=synthetic",
    "dataset.train_split=train",
    "dataset.val_split=val",
    "dataset.crop_size=64",
    *TINY_RUN,
]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _train(overrides: list[str]) -> None:
    """scripts/train.py with these command-line overrides, in this process."""
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = _compose(overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
    task = copy.deepcopy(cfg)
    with open_dict(task):
        del task["hydra"]
    HydraConfig.instance().set_config(cfg)
    try:
        script.main(task)
    finally:
        HydraConfig.instance().cfg = None


def _tiny_overrides(preset: str) -> list[str]:
    backbone = _compose([f"experiment={preset}", "dataset=synthetic"]).hydra.runtime.choices
    tiny = TINY.get(backbone["backbone"])
    return [f"backbone={tiny}"] if tiny else ["backbone.pretrained=false"]


def _dataset_choice(preset: str) -> str | None:
    """The dataset a preset picks, read from its file and the presets it builds on (composing
    would need that dataset's config)."""
    for entry in reversed(OmegaConf.load(CONFIGS / "experiment" / f"{preset}.yaml").defaults):
        if isinstance(entry, str):
            return _dataset_choice(entry)
        if "override /dataset" in entry:
            return entry["override /dataset"]
    return None


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_resolves(preset):
    cfg = _compose([f"experiment={preset}", "dataset=synthetic"])
    assert cfg.hydra.runtime.choices["experiment"] == preset
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_paper_recipe(preset):
    head, lr, iters, init_from = PAPER[preset]
    cfg = _compose([f"experiment={preset}", "dataset=synthetic"])
    choices = cfg.hydra.runtime.choices
    assert _dataset_choice(preset) == "sbd"  # SBD train: 8,498 images
    assert (choices["backbone"], choices["head"]) == ("vgg16", head)
    assert (choices["optimizer"], choices["scheduler"]) == ("sgd", "constant")
    assert cfg.optimizer.lr == lr and cfg.optimizer.momentum == 0.99
    assert cfg.optimizer.weight_decay == 5e-4
    assert cfg.param_groups.bias_lr_mult == 2 and cfg.param_groups.bias_weight_decay == 0
    assert cfg.loss.reduction == "sum" and cfg.trainer.amp == "none"
    assert cfg.trainer.batch_size == 1 and cfg.trainer.max_iters == iters
    assert cfg.trainer.eval_interval == 4000  # solve.py scores seg11valid every 4,000 steps
    assert cfg.dataset.val_split == "seg11valid" and cfg.dataset.train_split == "train"
    assert cfg.dataset.crop_size is None and not cfg.dataset.hflip
    assert cfg.head.learnable_upsample is False  # Caffe's lr_mult: 0 on every deconvolution
    assert cfg.model.init_from == init_from
    assert cfg.backbone.pretrained is (init_from is None)  # stages 2 and 3 start from stage 1
    assert cfg.hydra.run.dir == f"outputs/{preset}"


def test_presets_find_data_and_earlier_stages_under_the_paths_group(monkeypatch):
    """In a container (FCNSEG_OUTPUT_DIR=/outputs, data at FCNSEG_DATA_DIR), a staged preset
    reads the previous stage's run from the same output folder it writes its own run to."""
    monkeypatch.setenv("FCNSEG_OUTPUT_DIR", "/outputs")
    monkeypatch.setenv("FCNSEG_DATA_DIR", "/mnt/datasets")
    cfg = _compose(["experiment=voc_fcn8s"])
    assert cfg.model.init_from == "/outputs/voc_fcn16s/checkpoints/last.pt"
    assert cfg.hydra.run.dir == "/outputs/voc_fcn8s"
    assert cfg.dataset.root == "/mnt/datasets"
    assert _compose(["experiment=segnet_camvid"]).dataset.root == "/mnt/datasets/CamVid"
    plain = _compose([])
    assert plain.hydra.run.dir.startswith("/outputs/") and plain.dataset.root is None


def test_staged_presets_train_from_each_other(tmp_path, monkeypatch):
    """voc_fcn32s -> voc_fcn16s -> voc_fcn8s with the presets' own directories and init paths."""
    monkeypatch.chdir(tmp_path)
    for preset in ("voc_fcn32s", "voc_fcn16s", "voc_fcn8s"):
        _train([f"experiment={preset}", *ON_SYNTHETIC, *_tiny_overrides(preset)])
        run = tmp_path / "outputs" / preset
        ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
        assert ckpt["iteration"] == 2 and ckpt["config"]["loss"]["reduction"] == "sum"
        assert json.loads((run / "metrics.json").read_text())["num_images"] == 3
    log = (tmp_path / "outputs" / "voc_fcn8s" / "train.log").read_text()
    assert "initialised from outputs/voc_fcn16s/checkpoints/last.pt" in log
    assert "backbone (all 28 layers), head.score_fr, head.upscore2, head.score_pool4" in log
    # The FCN-16s layers were copied, then trained at lr 1e-14 for two steps: all but unchanged.
    before = torch.load(tmp_path / "outputs/voc_fcn16s/checkpoints/last.pt", weights_only=True)
    after = torch.load(tmp_path / "outputs/voc_fcn8s/checkpoints/last.pt", weights_only=True)
    for key in ("backbone.fc.fc6.weight", "head.score_pool4.weight"):
        torch.testing.assert_close(after["model"][key], before["model"][key], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "preset",
    [p for p in PRESETS if p not in ("voc_fcn32s", "voc_fcn16s", "voc_fcn8s")],
)
def test_preset_runs_two_iterations_on_synthetic(preset, tmp_path):
    run = tmp_path / "run"
    _train(
        [f"experiment={preset}", *ON_SYNTHETIC, *_tiny_overrides(preset), f"hydra.run.dir={run}"]
    )
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 2 and "hydra" not in ckpt["config"]
    assert json.loads((run / "metrics.json").read_text())["num_images"] == 3


def test_biases_learn_at_twice_the_rate_without_decay():
    """One SGD step by hand: weight -= lr (g + wd w); bias -= 2 lr g."""
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    lr, wd = 0.1, 0.5
    factory = instantiate(
        {"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr, "momentum": 0.99,
         "weight_decay": wd}
    )  # fmt: skip
    optimizer = with_param_groups(factory, model, bias_lr_mult=2, bias_weight_decay=0.0)(
        model.parameters()
    )
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    weights = [model[0].weight, model[1].weight]
    biases = [model[0].bias, model[1].bias]
    assert [g["lr"] for g in optimizer.param_groups] == [lr, 2 * lr]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [wd, 0.0]
    before = [p.detach().clone() for p in weights + biases]
    grads = [torch.randn_like(p) for p in weights + biases]
    for p, g in zip(weights + biases, grads):
        p.grad = g.clone()
    optimizer.step()
    scheduler.step()
    for p, b, g in zip(weights, before[:2], grads[:2]):
        torch.testing.assert_close(p.detach(), b - lr * (g + wd * b))
    for p, b, g in zip(biases, before[2:], grads[2:]):
        torch.testing.assert_close(p.detach(), b - 2 * lr * g)
    # Without the options the optimizer is the factory's own, in one group.
    plain = with_param_groups(factory, model)(model.parameters())
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["lr"] == lr
