"""Train a segmentation model: ``python scripts/train.py backbone=vgg16 head=fcn8s``.

On several GPUs: ``torchrun --nproc_per_node=4 scripts/train.py ...`` (docs/distributed.md).
"""

from pathlib import Path

import hydra
from fcnseg_cli.scripts import reports_config_errors
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fcnseg.data.class_weights import resolve_class_weights
from fcnseg.engine.ema import EMA
from fcnseg.engine.hooks import Hook
from fcnseg.engine.loss import SegLoss
from fcnseg.engine.optim import with_param_groups
from fcnseg.engine.record import RunRecord
from fcnseg.engine.runtime import Runtime, seed_everything
from fcnseg.engine.settings import TrainSettings
from fcnseg.engine.trainer import Trainer, TrainingInterrupted
from fcnseg.errors import UserError
from fcnseg.metrics import format_table
from fcnseg.models import build_model
from fcnseg.models.init import init_from_checkpoint
from fcnseg.utils.cli import check_settings, user_errors
from fcnseg.utils.distributed import cleanup, launch_command, local_main_first
from fcnseg.utils.logging import launched_as_main, setup_logging


@reports_config_errors
@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    # Logged from the first line: train.log receives it all once the run directory is accepted.
    setup_logging(main_process=launched_as_main(), hold=True)
    with user_errors("train.py", also=(InstantiationException,)):
        hooks = user_hooks(cfg.trainer)
        keys = [key for key in cfg.trainer if key not in HOOK_KEYS]
        check_settings("trainer", keys, TrainSettings)
        settings = instantiate(OmegaConf.masked_copy(cfg.trainer, keys))
        runtime = Runtime.from_settings(settings)  # device, process group, precision: once
        seed_everything(settings.seed)  # the initial weights follow the run's seed
        ds = cfg.dataset
        make_dataset, make_transform = instantiate(ds.builder), instantiate(ds.transform)
        train_set = make_dataset(split=ds.train_split, transform=make_transform(train=True))
        with local_main_first():  # one download, one count of the labels per machine
            loss = OmegaConf.to_container(cfg.loss, resolve=True)
            class_weights = resolve_class_weights(
                loss["class_weights"], power=loss.get("class_weight_power", 1.0),
                dataset=train_set, num_classes=ds.num_classes, ignore_index=ds.ignore_index,
                identity={"root": ds.root, "split": ds.train_split,
                          "builder": OmegaConf.to_container(ds.builder, resolve=True)},
            )  # fmt: skip
            model = build_model(
                backbone=instantiate(cfg.backbone), head=instantiate(cfg.head),
                num_classes=ds.num_classes,
            )  # fmt: skip
        # Staged training starts from the coarser net's layers (a resumed run then overrides them).
        init = init_from_checkpoint(model, cfg.model.init_from) if cfg.model.init_from else None
        trainer = Trainer(
            settings, runtime=runtime, model=model, train_set=train_set,
            val_set=make_dataset(split=ds.val_split, transform=make_transform(train=False)),
            optimizer=with_param_groups(instantiate(cfg.optimizer), model, **cfg.param_groups),
            scheduler=instantiate(cfg.scheduler),
            loss=SegLoss(weight=class_weights, ignore_index=ds.ignore_index,
                         reduction=cfg.loss.reduction),
            run_dir=HydraConfig.get().runtime.output_dir, batching=ds.get("batching", "pad"),
            record=RunRecord.from_config(
                OmegaConf.to_container(cfg, resolve=True), resume_command=resume_command()
            ),
            loggers=[instantiate(node) for node in (cfg.get("logger") or {}).values()],
            hooks=hooks,
        )  # fmt: skip
        if trainer.dist.is_main:
            save_hydra_config(cfg, trainer.run_dir / ".hydra")
        if init is not None:
            trainer.log.info(init.summary())
        try:
            metrics = trainer.fit()
        except TrainingInterrupted as stop:  # the trainer has logged how to resume
            raise SystemExit(stop.exit_code) from None
        finally:
            cleanup()
        if trainer.dist.is_main:
            print(f"\n{format_table(metrics)}\n\nrun directory: {trainer.run_dir}")


#: trainer.* keys that name hooks, not TrainSettings fields.
HOOK_KEYS = ("hooks", "ema")


def user_hooks(trainer: DictConfig) -> list[Hook]:
    """``trainer.hooks`` (each a ``_target_``: the user's own code) and ``trainer.ema.decay``."""
    hooks = []
    for i, node in enumerate(trainer.get("hooks") or []):
        hook = instantiate(node)
        if not isinstance(hook, Hook):
            raise UserError(
                f"trainer.hooks[{i}]: {node.get('_target_')} made a {type(hook).__name__}, "
                f"not a fcnseg.engine.hooks.Hook"
            )
        hooks.append(hook)
    decay = (trainer.get("ema") or {}).get("decay")
    return [*hooks, EMA(decay)] if decay is not None else hooks


def save_hydra_config(cfg: DictConfig, folder: Path) -> None:
    """What Hydra writes in ``.hydra/``, written once the run directory is accepted."""
    hydra_cfg = HydraConfig.get()
    folder.mkdir(exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")


def resume_command() -> str:
    """The command that continues this run in its own directory: the user's, with the run's
    overrides.

    A job of a multirun (``-m``: a sweep, ``hydra/launcher=slurm`` or ``submitit_local``) is
    continued by the multirun again, this job alone in its folder of the sweep: the same launcher
    submits it (a SLURM job again), with the same resources.
    """
    hydra_cfg = HydraConfig.get()

    def without(overrides, *keys: str) -> list[str]:
        return [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in keys]

    args = without(hydra_cfg.overrides.task, "trainer.resume")
    if getattr(hydra_cfg.mode, "name", None) == "MULTIRUN":  # None: a composed config
        here = ("hydra.mode", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.run.dir")
        args = ["-m", *without(hydra_cfg.overrides.hydra, *here), *args]
        args += [
            f"hydra.sweep.dir={Path(hydra_cfg.sweep.dir).absolute()}",
            f"hydra.sweep.subdir={hydra_cfg.sweep.subdir}",
        ]
    else:
        args.append(f"hydra.run.dir={hydra_cfg.runtime.output_dir}")
    # submitit's script starts a launcher's tasks: the program is this file or its command.
    program = __file__ if __name__ == "__main__" else "fcnseg-train"
    return launch_command([*args, "trainer.resume=true"], program=program)


if __name__ == "__main__":
    main()
