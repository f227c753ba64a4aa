"""Export a checkpoint: ``python scripts/export.py checkpoint=PATH format=onnx output=model.onnx``.

One file for every batch size and image size, with the class names, palette, ignore index,
normalisation, iteration and mIoU in its metadata; ``evaluate.py`` and ``predict.py`` run it
with ``runtime=onnx model=FILE``. Needs ``pip install 'fcnseg[onnx]'``.
"""

import hydra
from fcnseg_cli.scripts import reports_config_errors
from omegaconf import DictConfig

from fcnseg.deploy import check_export_output
from fcnseg.deploy.onnx import OnnxModel, compare_outputs, export_onnx
from fcnseg.errors import UserError
from fcnseg.models.builder import load_trained
from fcnseg.utils.cli import user_errors


@reports_config_errors
@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors("export.py"):
        for key in ("checkpoint", "output"):
            if cfg[key] is None:
                raise UserError(f"{key}=PATH is required (checkpoint=FILE output=FILE.onnx)")
        # Before the checkpoint is read: a refused output costs the user nothing.
        check_export_output(
            cfg.output, checkpoint=cfg.checkpoint, format=cfg.format, overwrite=cfg.overwrite
        )
        model, ckpt = load_trained(cfg.checkpoint)
        path = export_onnx(
            model, cfg.output, info=model.info, config=ckpt["config"], opset=cfg.opset
        )
        print(f"{cfg.checkpoint} exported to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        if cfg.check:
            for row in compare_outputs(model, OnnxModel(path), [tuple(s) for s in cfg.check]):
                print(
                    "onnxruntime vs PyTorch at {}x{}: max |difference| {:.3g} (largest logit "
                    "{:.3g}), labels {:.4%} equal".format(
                        *row["size"], row["max_abs_diff"], row["scale"], row["label_agreement"]
                    )
                )


if __name__ == "__main__":
    main()
