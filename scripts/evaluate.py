"""Evaluate a checkpoint: ``python scripts/evaluate.py checkpoint=PATH [split=val] [out=FILE]``,
or an exported model run by onnxruntime: ``runtime=onnx model=FILE.onnx``.

Exact under ``torchrun --nproc_per_node=N`` (each process scores a disjoint shard).
"""

import hydra
from fcnseg_cli.scripts import reports_config_errors
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fcnseg.data import build_transforms
from fcnseg.data.predictions import PredictionWriter
from fcnseg.data.trusted import dataset_builder
from fcnseg.deploy import load_for_inference
from fcnseg.engine.evaluator import evaluation_dataset, run_evaluation
from fcnseg.engine.inference import Inference
from fcnseg.errors import UserError
from fcnseg.metrics import format_table
from fcnseg.utils.cli import user_errors
from fcnseg.utils.distributed import cleanup, get_info
from fcnseg.utils.logging import setup_logging
from fcnseg.utils.outputs import check_evaluation_outputs, write_json


@reports_config_errors
@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors("evaluate.py", also=(InstantiationException,)):
        setup_logging()
        if cfg.checkpoint is None and cfg.runtime != "onnx":
            raise UserError("checkpoint=PATH is required: the checkpoint file to evaluate")
        # An exported file carries the training config in its metadata, as a checkpoint does.
        model, ckpt = load_for_inference(
            runtime=cfg.runtime, checkpoint=cfg.checkpoint, model=cfg.model
        )
        trained = ckpt["config"].get("dataset") or {}
        chosen = HydraConfig.get().runtime.choices.get("dataset") not in (None, "null")
        ds = evaluation_dataset(
            trained, OmegaConf.to_container(cfg.dataset, resolve=True), chosen=chosen
        )
        split = cfg.split or ds["val_split"]
        # The model sees images normalised as in training, whatever the dataset config says.
        transform = build_transforms(
            train=False, normalize=model.info.normalize, ignore_index=ds["ignore_index"]
        )
        source = cfg.model if cfg.runtime == "onnx" else cfg.checkpoint
        if chosen:
            make_dataset = instantiate(ds["builder"])
        else:  # read from the model file: data, built from fcnseg's own dataset classes only
            download = cfg.dataset.get("download")
            make_dataset = dataset_builder(ds.get("builder"), source=source, download=download)
        dataset = make_dataset(split=split, transform=transform)
        e = cfg.eval
        # Every output is checked before the evaluation, so that a refusal never follows a run.
        check_evaluation_outputs(
            dataset, out=cfg.out, grid=e.grid, tensorboard=e.tensorboard,
            save_predictions=e.save_predictions, overwrite=e.overwrite,
            read={"checkpoint": cfg.checkpoint, "model": cfg.model},
        )  # fmt: skip
        writer = e.save_predictions and PredictionWriter(
            e.save_predictions, dataset=dataset, format=e.format, colors=ds.get("palette"),
            overwrite=e.overwrite,
        )  # fmt: skip
        metrics = run_evaluation(
            model,
            dataset,
            class_names=ds["class_names"],
            ignore_index=ds["ignore_index"],
            normalize=model.info.normalize,
            inference=Inference.from_options(e),
            device=cfg.trainer.device,
            amp=cfg.trainer.amp,
            channels_last=cfg.trainer.channels_last,
            num_workers=cfg.trainer.num_workers,
            on_prediction=writer or None,
            tensorboard_dir=e.tensorboard,
            tensorboard_prefix=split,
            step=int(ckpt.get("iteration", 0)),
            num_vis=e.num_vis,
            grid=e.grid,
            colors=ds.get("palette"),
        )
        if get_info().is_main:
            print(f"{source} on {ds.get('name')} {split}:\n{format_table(metrics)}")
            if cfg.out:
                write_json(metrics, cfg.out, key="out", overwrite=e.overwrite)
                print(f"metrics written to {cfg.out}")
        cleanup()


if __name__ == "__main__":
    main()
