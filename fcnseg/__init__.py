"""fcnseg: fully convolutional semantic segmentation networks, trained and evaluated right."""

from fcnseg.models import build_model, load_model

__version__ = "0.1.0"
__all__ = ["build_model", "load_model"]
