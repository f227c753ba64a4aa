"""Measure speed: ``python scripts/benchmark.py bench=train backbone=vgg16 out=bench.json``.

``bench=`` picks the measurement (``configs/bench/``: train, infer, data, metrics, convert,
slide), whose ``_target_`` is a function of ``fcnseg.bench``; measured tables are in
``docs/benchmarks.md``.
"""

import shlex
import sys
from collections.abc import Callable
from typing import Any

import hydra
from fcnseg_cli.scripts import reports_config_errors
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fcnseg.bench.common import complete, write_report
from fcnseg.engine.inference import Inference
from fcnseg.engine.runtime import Runtime
from fcnseg.models import build_model
from fcnseg.utils.cli import user_errors


def pieces(cfg: DictConfig) -> dict[str, Callable[[], Any]]:
    """The objects a measurement may ask for, each built only if it does."""
    ds, tr = cfg.dataset, cfg.trainer
    return {
        "model": lambda: build_model(
            backbone=instantiate(cfg.backbone),
            head=instantiate(cfg.head),
            num_classes=ds.num_classes,
        ),
        "optimizer": lambda: instantiate(cfg.optimizer),
        "scheduler": lambda: instantiate(cfg.scheduler),
        "runtime": lambda: Runtime.setup(
            tr.device,
            amp=tr.amp,
            channels_last=tr.channels_last,
            compile=tr.compile,
            distributed=False,
        ),
        "inference": lambda: Inference.from_options(OmegaConf.to_container(cfg.eval, resolve=True)),
        "make_dataset": lambda: instantiate(ds.builder),
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """The report of the measurement ``cfg.bench`` names."""
    return complete(instantiate(cfg.bench), pieces(cfg))()


@reports_config_errors
@hydra.main(version_base="1.3", config_path="../configs", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    with user_errors("benchmark.py", also=(InstantiationException,)):
        report = run(cfg)
        report["command"] = shlex.join(["python", "scripts/benchmark.py", *sys.argv[1:]])
        print(write_report(report, cfg.out))


if __name__ == "__main__":
    main()
