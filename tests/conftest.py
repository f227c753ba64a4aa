"""Shared test helpers: composing configs and running scripts as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fcnseg.engine.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SCRIPTS = ROOT / "scripts"

# Small, fast settings for end-to-end runs on the synthetic dataset.
TINY_RUN = [
    "trainer.max_iters=2",
    "trainer.eval_interval=2",
    "trainer.log_interval=1",
    "trainer.batch_size=2",
    "trainer.num_workers=0",
    "trainer.device=cpu",
    "dataset.builder.num_samples={train: 8, val: 3, test: 3}",
]

torch.set_num_threads(min(2, torch.get_num_threads()))


def compose_config(overrides: list[str] | None = None, config_name: str = "train"):
    """The config a script would see with these command-line overrides."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            config_name=config_name, overrides=overrides or [], return_hydra_config=False
        )


#: trainer.* keys that are not TrainSettings fields (the trainer's hooks, built in train.py).
NOT_SETTINGS = ("_target_", "hooks", "ema")


def train_settings(**overrides) -> TrainSettings:
    """The quickstart's ``TrainSettings`` with ``overrides``: configs/trainer/default.yaml, then
    the synthetic recipe's ``trainer.*`` (length, batch, intervals), as ``python
    scripts/train.py`` composes them, so that a test never keeps a second copy of a default."""
    node = OmegaConf.merge(
        OmegaConf.load(CONFIGS / "trainer" / "default.yaml"),
        OmegaConf.load(CONFIGS / "recipe" / "synthetic.yaml").trainer,
    )
    values = {k: v for k, v in OmegaConf.to_container(node).items() if k not in NOT_SETTINGS}
    return TrainSettings(**{**values, **overrides})


def run_script(
    script: str, *args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None
):
    """Runs ``scripts/<script>`` in a fresh interpreter; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture
def tiny_run():
    return list(TINY_RUN)
