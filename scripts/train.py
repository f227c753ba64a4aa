"""Train a segmentation model: ``python scripts/train.py backbone=vgg16 head=fcn8s``."""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fcnseg.data import build_transforms
from fcnseg.engine.trainer import Trainer
from fcnseg.metrics import format_table
from fcnseg.models import build_model
from fcnseg.utils.cli import user_errors


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    with user_errors("train.py"):
        ds = cfg.dataset
        make_dataset = instantiate(ds.builder)
        augment = dict(normalize=ds.normalize, ignore_index=ds.ignore_index)
        train_tf = build_transforms(
            train=True, crop_size=ds.crop_size, scale_range=ds.scale_range, hflip=ds.hflip,
            color_jitter=ds.color_jitter, **augment,
        )  # fmt: skip
        model = build_model(backbone=instantiate(cfg.backbone), head=instantiate(cfg.head), num_classes=ds.num_classes)
        trainer = Trainer(
            model=model,
            train_set=make_dataset(split=ds.train_split, transform=train_tf),
            val_set=make_dataset(split=ds.val_split, transform=build_transforms(train=False, **augment)),
            optimizer=instantiate(cfg.optimizer),
            scheduler=instantiate(cfg.scheduler),
            run_dir=HydraConfig.get().runtime.output_dir,
            config=OmegaConf.to_container(cfg, resolve=True),
            class_names=ds.class_names,
            ignore_index=ds.ignore_index,
            normalize=ds.normalize,
            class_weights=cfg.loss.class_weights,
            loss_reduction=cfg.loss.reduction,
            **cfg.trainer,
        )
        metrics = trainer.fit()
        if trainer.dist.is_main:
            print(f"\n{format_table(metrics)}\n\nrun directory: {trainer.run_dir}")


if __name__ == "__main__":
    main()
