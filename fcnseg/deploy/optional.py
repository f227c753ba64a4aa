"""The optional packages that deployment needs (onnx, onnxscript, onnxruntime), imported when
used, so that training and evaluation in PyTorch run without them."""

from __future__ import annotations

import importlib
import types

from fcnseg.errors import UserError

INSTALL_HINT = "pip install 'fcnseg[onnx]'"


def require(module: str, purpose: str) -> types.ModuleType:
    """Imports an optional dependency, or says in one sentence how to install it.

    Raises:
        UserError: ``module`` is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(
            f"{purpose} needs the {module} package, which is not installed: {INSTALL_HINT}"
        ) from err
