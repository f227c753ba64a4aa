"""Predict image files: ``python scripts/predict.py checkpoint=PATH input=FILE_OR_DIR output=DIR``
(or ``runtime=onnx model=FILE.onnx`` for an exported model, run by onnxruntime).

Writes ``NAME.png`` (palette label map, the photo's width and height as viewers show it) and
``NAME_overlay.jpg`` (the image blended with the class colours, with a legend) for every image.
An unreadable image is reported and skipped (``skip_unreadable=false``: it stops the run); the
exit status is then 1.
"""

import sys

import hydra
from fcnseg_cli.scripts import reports_config_errors
from omegaconf import DictConfig

from fcnseg.deploy import load_for_inference
from fcnseg.engine.inference import Inference
from fcnseg.engine.predictor import check_prediction_paths, predict_images
from fcnseg.errors import UserError
from fcnseg.utils.cli import user_errors


@reports_config_errors
@hydra.main(version_base="1.3", config_path="../configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    skipped = []

    def skip(err: UserError) -> None:
        print(f"skipped: {err}", file=sys.stderr, flush=True)
        skipped.append(err)

    with user_errors("predict.py"):
        for key in ("input", "output"):
            if cfg[key] is None:
                raise UserError(
                    f"{key}=PATH is required (checkpoint=FILE input=FILE_OR_DIR output=DIR)"
                )
        # Before the model is read: a refused output folder costs the user nothing.
        check_prediction_paths(cfg.input, cfg.output, overwrite=cfg.overwrite)
        model, _ = load_for_inference(
            runtime=cfg.runtime, checkpoint=cfg.checkpoint, model=cfg.model
        )  # its ``info`` gives the classes, colours and normalisation
        written = predict_images(
            model,
            cfg.input,
            cfg.output,
            inference=Inference.from_options(cfg.eval),
            device=cfg.trainer.device,
            channels_last=cfg.trainer.channels_last,
            alpha=cfg.alpha,
            overwrite=cfg.overwrite,
            on_unreadable=skip if cfg.skip_unreadable else None,
        )
        print(f"{len(written)} image(s) predicted into {cfg.output}")
    if skipped:
        print(f"{len(skipped)} unreadable image(s) skipped (listed above)", file=sys.stderr)
        sys.exit(1)  # after the others: a pipeline can stop on a run that missed images


if __name__ == "__main__":
    main()
