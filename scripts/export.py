"""Export a checkpoint: ``fcnseg-export checkpoint=PATH output=model.onnx`` (from a checkout,
``python scripts/export.py ...``).

By default one file for every batch size and image size; ``input_size=[H,W]`` fixes the size
and folds every shape computation, for runtimes that need static shapes (OpenCV's DNN module);
``outputs=labels`` puts the argmax in the graph; ``quantize=int8`` writes a statically quantized
model calibrated on the checkpoint's training images. The metadata carry the class names,
palette, ignore index, normalisation, iteration and mIoU; ``fcnseg-evaluate`` and
``fcnseg-predict`` run the file with ``runtime=onnx model=FILE``. Needs
``pip install 'fcnseg[onnx]'``.
"""

import hydra
from fcnseg_cli.scripts import reports_config_errors
from omegaconf import DictConfig, OmegaConf

from fcnseg.deploy import check_export_output, export_checkpoint
from fcnseg.deploy.session import OnnxModel, compare_outputs
from fcnseg.engine.calibration import dataset_images
from fcnseg.errors import UserError
from fcnseg.utils.cli import user_errors


@reports_config_errors
@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors("export.py"):
        for key in ("checkpoint", "output"):
            if cfg[key] is None:
                raise UserError(f"{key}=PATH is required (checkpoint=FILE output=FILE.onnx)")
        options = OmegaConf.to_container(cfg, resolve=True)
        size = options["input_size"]
        chosen = {k: options[k] for k in ("opset", "input_size", "outputs", "quantize")}
        # Before the checkpoint is read: a refused output or option costs the user nothing.
        check_export_output(
            cfg.output, checkpoint=cfg.checkpoint, format=cfg.format, overwrite=cfg.overwrite,
            **chosen,
        )  # fmt: skip
        done = export_checkpoint(
            cfg.checkpoint, cfg.output, format=cfg.format, overwrite=cfg.overwrite, **chosen,
            calibration_images=cfg.calibration_images, heldout_images=cfg.heldout_images,
            dataset_root=cfg.dataset.root, read_images=dataset_images,
        )  # fmt: skip
        path = done.path
        print(f"{cfg.checkpoint} exported to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        if done.agreement is not None:
            train, held = done.splits
            count = len(done.calibration)
            print(f"INT8 calibrated on {count} {train} image(s) at {size[0]}x{size[1]}:")
            print("".join(f"  {name}\n" for name in done.calibration), end="")
            print(
                f"INT8 labels equal float32's on {done.agreement:.4%} of the pixels of "
                f"{len(done.heldout)} held-out {held} image(s)"
            )
        elif cfg.check:  # random inputs at the fixed size, else at each size asked
            sizes = [tuple(size)] if size else [tuple(s) for s in cfg.check]
            for row in compare_outputs(done.model, OnnxModel(path), sizes):
                diff, (h, w) = row["max_abs_diff"], row["size"]
                detail = "" if diff is None else f"max |difference| {diff:.3g} (largest logit "
                detail += "" if diff is None else f"{row['scale']:.3g}), "
                print(
                    f"onnxruntime vs PyTorch at {h}x{w}: {detail}labels "
                    f"{row['label_agreement']:.4%} equal"
                )


if __name__ == "__main__":
    main()
