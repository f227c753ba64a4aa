"""ONNX export: one file for every image size, whose logits are PyTorch's, whose metadata say
what the model expects, and which evaluate.py and predict.py run with ``runtime=onnx``."""

import json
import sys

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image
from test_evaluate import make_checkpoint, val_set

import fcnseg
from fcnseg.deploy import (
    OnnxModel,
    check_export_output,
    export_onnx,
    load_for_inference,
    read_metadata,
)
from fcnseg.errors import UserError
from fcnseg.models.info import ModelInfo
from fcnseg.utils.checkpoint import load_checkpoint, save_checkpoint
from fcnseg.utils.normalization import NORMALIZATIONS
from fcnseg.utils.visualize import palette

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# Odd sizes (1x1: every map of the net is 1x1; 33x47 and 97x131: every pooling rounds up),
# and SegNet's CamVid frame size.
SIZES = [(1, 1), (33, 47), (97, 131), (360, 480)]


def logits_pair(model, session, size, *, seed=0):
    batch = 2 if size[0] * size[1] < 100 * 100 else 1  # the batch axis is dynamic too
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model(x)
    return want, session(x)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A training checkpoint of a vgg_tiny FCN-8s, exported by scripts/export.py."""
    root = tmp_path_factory.mktemp("export")
    model, config = make_checkpoint(root / "model.pt")
    ckpt = load_checkpoint(root / "model.pt")
    save_checkpoint({**ckpt, "best_miou": 0.4321}, root / "model.pt")
    proc = run_script(
        "export.py", f"checkpoint={root / 'model.pt'}", f"output={root / 'model.onnx'}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, model, config, proc.stdout


def randomised(head, backbone="vgg_tiny"):
    """A model whose zero-initialised score layers are random, so that its logits vary."""
    torch.manual_seed(0)
    model = fcnseg.build_model(backbone=backbone, head=head, num_classes=5).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module", params=["fcn32s", "fcn16s", "fcn8s"])
def fcn(request, exported, tmp_path_factory):
    """(PyTorch model, onnxruntime model) of each FCN head. FCN-8s is the script's export of the
    compact vgg_tiny geometry; FCN-32s/16s are the paper's (conv1_1 padded by 100), whose
    crops of 19, 5 and 27 cells depend on the input's size."""
    if request.param == "fcn8s":
        root, model, *_ = exported
        return model, OnnxModel(root / "model.onnx")
    model = randomised(request.param)
    path = export_onnx(model, tmp_path_factory.mktemp("fcn") / "m.onnx")
    return model, OnnxModel(path)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fcn_logits_equal_pytorch_at_any_size(fcn, size):
    want, got = logits_pair(*fcn, size)
    assert got.shape == want.shape == (want.shape[0], 5, *size)
    scale = want.abs().max()
    assert scale > 0.1  # not a net of zeros
    assert (got - want).abs().max() <= 1e-4 * scale


def test_segnet_logits_agree_up_to_pooling_ties(tmp_path):
    """SegNet's unpooling puts each value where the encoder's max pooling found its maximum.
    Where two inputs of a 2x2 window differ by less than float32 rounding, onnxruntime's
    convolutions (another summation order than oneDNN's) can pick the other one, and the
    decoder's values move by one pixel there: the logits agree to 1e-4 of their scale except
    at such spots, and the labels on at least 99.9% of the pixels (measured: all of them at
    1x1 to 97x131, 99.9997% at 360x480)."""
    model = randomised("segnet", "vgg_tiny_encoder")
    session = OnnxModel(export_onnx(model, tmp_path / "segnet.onnx"))
    for size in SIZES:
        want, got = logits_pair(model, session, size)
        assert got.shape == want.shape
        diff = (got - want).abs() / want.abs().max()
        assert float(diff.flatten().quantile(0.999)) <= 1e-4, size
        assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.999, size


def test_metadata_round_trip(exported):
    root, _, config, stdout = exported
    info, stored = read_metadata(root / "model.onnx")
    ds = config["dataset"]
    assert info == ModelInfo(
        class_names=tuple(ds["class_names"]),
        palette=tuple(tuple(int(c) for c in rgb) for rgb in palette(5)),  # no dataset palette
        ignore_index=ds["ignore_index"],
        normalize=ds["normalize"],
        iteration=7,
        miou=0.4321,
    )
    assert info == fcnseg.load_model(root / "model.pt").info
    assert stored == config
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(root / "model.onnx")).metadata_props}
    norm = json.loads(meta["normalization"])  # spelled out for consumers without fcnseg
    assert norm["mean"] == list(NORMALIZATIONS["imagenet"].mean)
    assert norm["std"] == list(NORMALIZATIONS["imagenet"].std)
    assert (norm["max_pixel_value"], norm["channel_order"]) == (255.0, "RGB")
    # The script's own check ran at 97x131.
    assert "onnxruntime vs PyTorch at 97x131" in stdout and "labels 100.0000% equal" in stdout


def test_evaluate_onnx_gives_the_checkpoints_confusion_matrix(exported, tmp_path):
    root, model, config, _ = exported
    confusion = np.zeros((5, 5), np.int64)  # computed here, image by image, in PyTorch
    dataset = val_set(config)
    with torch.no_grad():
        for image, mask in (dataset[i] for i in range(len(dataset))):
            pred, valid = model(image[None]).argmax(1)[0], mask != 255
            confusion += np.bincount((mask[valid] * 5 + pred[valid]).numpy(), minlength=25).reshape(
                5, 5
            )
    assert (confusion.sum(0) > 0).sum() >= 3  # several classes predicted
    proc = run_script(
        "evaluate.py", "runtime=onnx", f"model={root / 'model.onnx'}", f"out={tmp_path / 'm.json'}",
        "trainer.device=cpu", "trainer.num_workers=0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    np.testing.assert_array_equal(np.asarray(metrics["confusion_matrix"]), confusion)


def test_predict_onnx_writes_the_checkpoints_labels(exported, tmp_path):
    root, model, config, _ = exported
    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    for name, (h, w) in {"a.png": (37, 53), "b.png": (64, 41)}.items():
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "in" / name)
    proc = run_script(
        "predict.py", "runtime=onnx", f"model={root / 'model.onnx'}", f"input={tmp_path / 'in'}",
        f"output={tmp_path / 'out'}", "trainer.device=cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictor = fcnseg.Predictor(root / "model.pt", device="cpu")
    for name in ("a.png", "b.png"):
        with Image.open(tmp_path / "out" / name) as labels:
            np.testing.assert_array_equal(np.asarray(labels), predictor(tmp_path / "in" / name))


def test_export_refuses_before_reading_the_checkpoint(exported, tmp_path, monkeypatch):
    root = exported[0]
    before = (root / "model.onnx").read_bytes()
    proc = run_script(
        "export.py", f"checkpoint={tmp_path / 'missing.pt'}", f"output={root / 'model.onnx'}"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"export.py: error: output={root / 'model.onnx'} exists; pass overwrite=true to replace it"
    ]
    assert (root / "model.onnx").read_bytes() == before
    with pytest.raises(UserError, match="is the checkpoint itself"):
        check_export_output(root / "model.pt", checkpoint=root / "model.pt", overwrite=True)
    with pytest.raises(UserError, match="format=torchscript is not supported"):
        check_export_output(tmp_path / "m.pt", format="torchscript")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    hint = r"needs the onnxscript package.*pip install 'fcnseg\[onnx\]'"
    with pytest.raises(UserError, match=hint):
        check_export_output(tmp_path / "m.onnx")


def test_runtime_onnx_needs_an_exported_file(tmp_path):
    with pytest.raises(UserError, match="runtime=onnx needs model=FILE.onnx"):
        load_for_inference(runtime="onnx", checkpoint="best.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_for_inference(runtime="onnx", model=tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        load_for_inference(runtime="onnx", model=tmp_path / "bad.onnx")
