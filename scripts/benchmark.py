"""Measure speed: ``python scripts/benchmark.py backbone=vgg16 bench.mode=train out=bench.json``.

Modes and keys are documented in ``configs/benchmark.yaml``, the measuring code is
``fcnseg.engine.benchmark``, and measured tables are in ``docs/benchmarks.md``.
"""

import shlex
import sys
from typing import Any

import hydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fcnseg.engine.benchmark import run_benchmark, write_report
from fcnseg.engine.inference import Inference
from fcnseg.models import build_model
from fcnseg.utils.cli import user_errors


def run(cfg: DictConfig) -> dict[str, Any]:
    """The report of the measurement ``cfg.bench.mode`` names."""
    ds = cfg.dataset

    def model():
        backbone, head = instantiate(cfg.backbone), instantiate(cfg.head)
        return build_model(backbone=backbone, head=head, num_classes=ds.num_classes)

    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    return run_benchmark(
        options=plain(cfg.bench),
        build_model=model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
        trainer_options=plain(cfg.trainer),
        dataset_options={k: v for k, v in plain(ds).items() if k != "builder"},
        make_dataset=instantiate(ds.builder) if ds.root else None,
        inference=Inference.from_options(plain(cfg.eval)),
    )


@hydra.main(version_base="1.3", config_path="../configs", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    with user_errors("benchmark.py", also=(InstantiationException,)):
        report = run(cfg)
        report["command"] = shlex.join(["python", "scripts/benchmark.py", *sys.argv[1:]])
        print(write_report(report, cfg.out))


if __name__ == "__main__":
    main()
