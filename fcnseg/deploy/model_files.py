"""``open_model``: the one way to open a model file, a training checkpoint (rebuilt in PyTorch)
or an exported ONNX file (run by onnxruntime), whichever it is.

The runtime is the caller's choice where it makes one (``runtime=torch`` or ``runtime=onnx``
in the scripts), else the file's own first bytes decide: ``torch.save`` writes a zip archive
(or, before PyTorch 1.6, a pickle), an ONNX file is a protobuf whose first field is the IR
version. A file given to the other runtime is refused in one sentence that says how to run it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fcnseg.deploy.session import load_onnx
from fcnseg.errors import UserError
from fcnseg.models.loading import load_trained

RUNTIMES = ("torch", "onnx")
#: The first bytes of what ``torch.save`` writes: a zip archive, or a pickle (protocol 2+).
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
#: The first byte of an ONNX file: field 1 (``ir_version``), a varint, which ``onnx.save``
#: writes first.
ONNX_MAGIC = b"\x08"


def model_runtime(path: str | Path) -> str:
    """The runtime that opens the file at ``path``: ``torch`` for what ``torch.save`` wrote,
    ``onnx`` for an ONNX file, by its first bytes, else by its suffix (``.onnx``).

    A file that is neither is given to ``torch``, whose reader says what it is instead.
    """
    return _content(path) or ("onnx" if Path(path).suffix.lower() == ".onnx" else "torch")


def open_model(path: str | Path, *, runtime: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a model file, in eval mode, and its checkpoint (or an exported file's
    checkpoint-like metadata).

    Either way the network's ``info`` is its ``ModelInfo`` and the dict holds ``config``
    (with its ``dataset``), ``iteration`` and ``best_miou``.

    Args:
        path: a checkpoint written by training or ``fcnseg-import-weights``, or a file written
            by ``fcnseg-export``.
        runtime: ``torch`` (a checkpoint, rebuilt in PyTorch), ``onnx`` (an exported file, run
            by onnxruntime), or ``None``: whichever the file is (``model_runtime``).

    Raises:
        UserError: an unknown runtime, a file the runtime cannot open (a checkpoint given to
            onnxruntime, an exported model given as a checkpoint), or an unreadable file.
    """
    if runtime is not None and runtime not in RUNTIMES:
        raise UserError(f"runtime={runtime} is not one of {', '.join(RUNTIMES)}")
    if runtime == "onnx" and _content(path) == "torch":
        raise UserError(
            f"{path} is a PyTorch checkpoint, not an exported ONNX model; run it with "
            f"runtime=torch checkpoint={path}, or export it with fcnseg-export"
        )
    if (runtime or model_runtime(path)) == "onnx":
        return load_onnx(path)
    # The checkpoint reader refuses an exported model in one sentence that says how to run it.
    return load_trained(path)


def load_for_inference(
    *, runtime: str = "torch", checkpoint: str | Path | None = None, model: str | Path | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """``open_model`` for the scripts' keys: ``runtime=torch checkpoint=PATH`` or
    ``runtime=onnx model=FILE.onnx``.

    Raises:
        UserError: an unknown runtime, the key it needs not given, or ``open_model``'s.
    """
    if runtime not in RUNTIMES:
        raise UserError(f"runtime={runtime} is not one of {', '.join(RUNTIMES)}")
    if runtime == "onnx" and model is None:
        raise UserError("runtime=onnx needs model=FILE.onnx, a file written by fcnseg-export")
    if runtime == "torch" and checkpoint is None:
        raise UserError("checkpoint=PATH is required (or runtime=onnx model=FILE.onnx)")
    return open_model(model if runtime == "onnx" else checkpoint, runtime=runtime)


def _content(path: str | Path) -> str | None:
    """``torch`` or ``onnx`` as the first bytes of the file say, ``None`` for neither or for a
    file that cannot be read."""
    try:
        with open(Path(path).expanduser(), "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head.startswith(TORCH_MAGIC):
        return "torch"
    return "onnx" if head.startswith(ONNX_MAGIC) else None
