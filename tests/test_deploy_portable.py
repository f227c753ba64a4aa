"""Portable ONNX files: a fixed size with every shape folded, which OpenCV's DNN module (4.x)
loads with onnxruntime's labels for every head; the argmax in the graph; the opsets; INT8."""

import json

import numpy as np
import pytest
import torch
from conftest import run_script
from test_evaluate import make_checkpoint, val_set

import fcnseg
from fcnseg.data import SyntheticShapes, build_transforms
from fcnseg.deploy.export import check_export_options, export_onnx
from fcnseg.deploy.portable import OPSETS, convert_opset
from fcnseg.deploy.quantize import label_agreement, quantize_onnx
from fcnseg.deploy.session import OnnxModel
from fcnseg.engine.inference import Inference
from fcnseg.errors import UserError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
cv2 = pytest.importorskip("cv2")

HEADS = {
    "fcn32s": "vgg_tiny",
    "fcn16s": "vgg_tiny",
    "fcn8s": "vgg_tiny",
    "segnet": "vgg_tiny_encoder",
    "deconvnet": "vgg_tiny_encoder",
}
# Odd sides: every ceil-mode pooling has windows past the border, and DeconvNet's 2x2 pool5 is
# padded up to fc6's 7x7 window.
SIZE = (45, 61)


def randomised(head):
    """A model whose zero-initialised score layers are random, so that its logits vary."""
    torch.manual_seed(0)
    model = fcnseg.build_model(backbone=HEADS[head], head=head, num_classes=5).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.5)
    return model


def images(n=2, size=SIZE, seed=0):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


# The unpooling heads' exports trace five scatter-free unpoolings: 10-30 s each on 2 cores.
PARAMS = [
    pytest.param(head, marks=[pytest.mark.slow] if HEADS[head].endswith("_encoder") else [])
    for head in sorted(HEADS)
]


@pytest.fixture(scope="module", params=PARAMS)
def fixed(request, tmp_path_factory):
    """(head, PyTorch model, its export at SIZE)."""
    model = randomised(request.param)
    path = export_onnx(model, tmp_path_factory.mktemp("fixed") / "m.onnx", input_size=SIZE)
    return request.param, model, path


def test_fixed_size_graph_computes_no_shape(fixed):
    _, _, path = fixed
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    # Neither shape arithmetic nor the unpooling's scatter and MaxPool indices are left.
    assert not ops & {"Shape", "Size", "Range", "ConstantOfShape", "Expand", "ScatterND"}
    assert all(len(n.output) == 1 for n in proto.graph.node if n.op_type == "MaxPool")
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, *SIZE] and isinstance(dims[0], str)  # the batch stays free
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["outputs"] == "logits" and json.loads(meta["input_size"]) == list(SIZE)


def test_opencv_dnn_loads_the_fixed_size_export_with_onnxruntimes_labels(fixed):
    head, model, path = fixed
    x = images()
    with torch.no_grad():
        want = model(x)
    session = OnnxModel(path)
    assert session.input_size == SIZE and session.outputs == "logits"
    got = session(x)
    net = cv2.dnn.readNetFromONNX(str(path))
    net.setInput(x.numpy())
    opencv = torch.from_numpy(net.forward())
    scale = want.abs().max()
    assert scale > 0.1  # not a net of zeros
    assert opencv.shape == got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * scale, head
    assert (opencv - got).abs().max() <= 1e-4 * scale, head
    assert torch.equal(opencv.argmax(1), got.argmax(1)), head
    with pytest.raises(UserError, match=r"takes 45x61 images only .* not 46x61"):
        session(images(1, (46, 61)))


def test_labels_output_is_the_argmax_of_the_logits_in_the_opset_asked(fixed, tmp_path):
    """outputs=labels in opset 15 (converted from the exporter's own): uint8 label maps equal
    to the argmax of the logits file's, in onnxruntime and in OpenCV."""
    head, model, logits_path = fixed
    if head != "fcn8s":
        pytest.skip("one head is enough: the argmax follows whatever graph")
    path = export_onnx(model, tmp_path / "labels.onnx", input_size=SIZE, outputs="labels", opset=15)
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [15]
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert {p.key: p.value for p in proto.metadata_props}["outputs"] == "labels"
    x = images(3, seed=1)
    want = OnnxModel(logits_path)(x).argmax(1)
    labels = OnnxModel(path)
    assert labels.outputs == "labels"
    got = labels(x)
    assert got.dtype == torch.int64 and got.shape == (3, *SIZE)
    assert torch.equal(got, want)
    assert len(got.unique()) >= 3  # several classes: the comparison says something
    net = cv2.dnn.readNetFromONNX(str(path))
    net.setInput(x.numpy())
    assert np.array_equal(net.forward().reshape(3, *SIZE).astype(np.int64), want.numpy())


def test_every_opset_offered_runs_with_the_same_logits(fixed):
    _, model, path = fixed
    proto = onnx.load(str(path))
    x = images(1)
    reference = OnnxModel(path)(x)
    import onnxruntime as ort

    for opset in (OPSETS[0], OPSETS[-1]):
        converted = convert_opset(proto, opset)
        assert converted.opset_import[0].version == opset
        session = ort.InferenceSession(
            converted.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        (out,) = session.run(None, {"images": x.numpy()})
        assert np.allclose(out, reference.numpy(), rtol=0, atol=1e-5 * reference.abs().max())


@pytest.mark.parametrize("opset", [7, 9, 13, 14, 26, True])
def test_opsets_out_of_range_are_refused_in_one_sentence(opset):
    with pytest.raises(UserError) as err:
        check_export_options(opset=opset)
    assert str(err.value) == (
        f"opset={opset} is not supported: fcnseg writes opsets 15 to 25 (ONNX's version "
        "converter takes its networks no lower)"
    )


def test_option_errors_are_one_sentence():
    with pytest.raises(UserError, match="outputs=argmax is not one of logits, labels"):
        check_export_options(outputs="argmax")
    with pytest.raises(UserError, match=r"quantize=int8 needs a fixed input_size=\[HEIGHT,WIDTH\]"):
        check_export_options(quantize="int8")
    with pytest.raises(UserError, match="quantize=fp16 is not supported"):
        check_export_options(quantize="fp16", input_size=SIZE)
    with pytest.raises(UserError, match="input_size=.* must be a side or a"):
        check_export_options(input_size=[1, 2, 3])


def synthetic(split, n, size=SIZE):
    data = SyntheticShapes(
        split=split,
        num_samples=n,
        min_size=48,
        max_size=80,
        transform=build_transforms(train=False),
    )
    return [
        torch.nn.functional.interpolate(data[i][0][None], size=size, mode="bilinear")[0]
        for i in range(n)
    ]


def test_int8_runs_and_mostly_agrees_with_float32(fixed, tmp_path):
    head, _, path = fixed
    if head not in ("fcn8s", "segnet"):
        pytest.skip("one FCN and one unpooling head")
    int8 = quantize_onnx(path, tmp_path / "int8.onnx", synthetic("train", 8))
    proto = onnx.load(str(int8))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["quantization"])["calibration_images"] == 8
    assert meta["outputs"] == "logits"  # the float32 file's metadata are kept
    heldout = synthetic("val", 4)
    fp32, quantized = OnnxModel(path), OnnxModel(int8)
    # Computed here: the labels of each held-out image, pixel by pixel.
    equal = sum(
        int((fp32(x[None]).argmax(1) == quantized(x[None]).argmax(1)).sum()) for x in heldout
    )
    agreement = label_agreement(fp32, quantized, heldout)
    assert agreement == equal / (4 * SIZE[0] * SIZE[1])
    # Random weights leave small margins between classes, which int8 rounding flips: a
    # generous bound, well above chance (1/5) for the deeper random decoder.
    assert agreement >= (0.8 if head == "fcn8s" else 0.4), agreement


def test_a_labels_file_runs_whole_images_only(tmp_path):
    """evaluate.py and predict.py run a labels file as a logits one; averaging views needs
    logits, refused in one sentence."""
    path = tmp_path / "model.pt"
    model, config = make_checkpoint(path)
    proc = run_script(
        "export.py", f"checkpoint={path}", f"output={tmp_path / 'labels.onnx'}", "outputs=labels"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "labels 100.0000% equal" in proc.stdout
    predictor = fcnseg.Predictor(tmp_path / "labels.onnx", device="cpu")
    reference = fcnseg.Predictor(path, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predictor(image), reference(image))
    with pytest.raises(UserError, match="gives no logits"):
        predictor(image, probabilities=True)
    flipped = fcnseg.Predictor(
        tmp_path / "labels.onnx", device="cpu", inference=Inference(flip=True)
    )
    with pytest.raises(UserError, match="was exported with outputs=labels, so Inference"):
        flipped(image)
    image, _ = val_set(config)[0]
    with torch.no_grad():
        want = model(image[None]).argmax(1)
    assert torch.equal(OnnxModel(tmp_path / "labels.onnx")(image[None]), want)


@pytest.mark.slow
def test_export_int8_calibrates_on_the_checkpoints_training_images(tmp_path):
    """quantize=int8 reads the checkpoint's dataset through fcnseg's allow-list, names the
    calibration images and reports the agreement with float32 on validation images."""
    make_checkpoint(tmp_path / "model.pt")
    proc = run_script(
        "export.py", f"checkpoint={tmp_path / 'model.pt'}", f"output={tmp_path / 'int8.onnx'}",
        "input_size=[48,64]", "quantize=int8", "calibration_images=3", "heldout_images=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = lines.index("INT8 calibrated on 3 train image(s) at 48x64:")
    assert [line.strip() for line in lines[start + 1 : start + 4]] == [
        f"synthetic train sample {i}"
        for i in (0, 2, 3)  # 0, 1.5 and 3 of the 4 samples 0-3, rounded half to even
    ]
    agreement = [line for line in lines if line.startswith("INT8 labels equal float32's on ")]
    assert agreement and agreement[0].endswith("of the pixels of 2 held-out val image(s)")
    assert float(agreement[0].split(" on ")[1].split("%")[0]) >= 80
    proto = onnx.load(str(tmp_path / "int8.onnx"))
    assert "QuantizeLinear" in {n.op_type for n in proto.graph.node}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["quantization"])["calibration_images"] == 3
    assert meta["class_names"] and json.loads(meta["input_size"]) == [48, 64]
    proc = run_script(
        "export.py", f"checkpoint={tmp_path / 'model.pt'}", f"output={tmp_path / 'b.onnx'}",
        "quantize=int8",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "quantize=int8 needs a fixed input_size=[HEIGHT,WIDTH]" in proc.stderr
