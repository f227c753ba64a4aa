"""Import trained weights: ``python scripts/import_weights.py format=torchfcn head=fcn8s
input=fcn8s_from_caffe.pth output=fcn8s_caffe.pt``.

The checkpoint it writes is read by ``fcnseg.load_model``, ``scripts/evaluate.py`` and
``scripts/predict.py``, and can start training (``model.init_from=...``).
"""

import hydra
from fcnseg_cli.scripts import reports_config_errors
from omegaconf import DictConfig, OmegaConf

from fcnseg.errors import UserError
from fcnseg.models import torchfcn
from fcnseg.utils.checkpoint import save_checkpoint
from fcnseg.utils.cli import user_errors

FORMATS = {"torchfcn": torchfcn.import_checkpoint}


@reports_config_errors
@hydra.main(version_base="1.3", config_path="../configs", config_name="import_weights")
def main(cfg: DictConfig) -> None:
    with user_errors("import_weights.py"):
        if cfg.format not in FORMATS:
            raise UserError(f"format={cfg.format} is not one of {', '.join(FORMATS)}")
        for key in ("input", "output"):
            if cfg[key] is None:
                raise UserError(
                    f"{key}=PATH is required (format=... head=... input=FILE output=FILE)"
                )
        config = OmegaConf.to_container(cfg, resolve=True)
        model_config = {key: config[key] for key in ("backbone", "head", "dataset")}
        checkpoint = FORMATS[cfg.format](cfg.input, config=model_config)
        save_checkpoint(checkpoint, cfg.output)
        ds = checkpoint["config"]["dataset"]
        print(
            f"{cfg.output}: {cfg.format} {checkpoint['source']['head']} weights for "
            f"{ds['num_classes']} classes ({ds['name']}), input normalisation {ds['normalize']}"
        )


if __name__ == "__main__":
    main()
