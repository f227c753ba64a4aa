"""scripts/predict.py and fcnseg.Predictor: a label PNG of the input's exact size (a photo's as
viewers show it) and an overlay per image; the same labels from Python, for arrays, PIL images
and paths; an unreadable image is reported and the others predicted."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image, ImageOps
from test_evaluate import make_checkpoint

import fcnseg
from fcnseg.data import build_transforms
from fcnseg.data.io import read_image
from fcnseg.engine.inference import Inference
from fcnseg.engine.predictor import Predictor, predict_images
from fcnseg.errors import UserError
from fcnseg.models.info import ModelInfo
from fcnseg.utils.visualize import palette

# Odd sizes (width, height), an RGBA PNG, a JPEG and a grey BMP, one in a subfolder.
INPUTS = {"a.png": ((47, 33), "RGBA"), "sub/b.jpg": ((29, 51), "RGB"), "c.bmp": ((40, 41), "L")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    model, config = make_checkpoint(root / "model.pt")
    rng = np.random.default_rng(0)
    for name, ((w, h), mode) in INPUTS.items():
        (root / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        channels = {"RGBA": 4, "RGB": 3, "L": 1}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
            root / "in" / name
        )
    return root, model, config


def expected_labels(model, config, path):
    """The prediction computed here: the image as RGB, normalised as in training, argmax."""
    rgb = read_image(path)
    x, _ = build_transforms(train=False, normalize=config["dataset"]["normalize"])(
        rgb, np.zeros(rgb.shape[:2], np.uint8)
    )
    with torch.no_grad():
        return model(x[None]).argmax(1)[0].numpy()


@pytest.fixture(scope="module")
def script_run(setup):
    root = setup[0]
    return run_script(
        "predict.py",
        f"checkpoint={root / 'model.pt'}",
        f"input={root / 'in'}",
        f"output={root / 'out'}",
        "trainer.device=cpu",
    )


def test_predict_script_writes_label_maps_and_overlays(setup, script_run):
    root, model, config = setup
    proc = script_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 image(s)" in proc.stdout
    for name, ((w, h), _) in INPUTS.items():
        stem = (root / "out" / name).with_suffix("")
        with Image.open(stem.with_name(stem.name + ".png")) as labels:
            assert labels.mode == "P" and labels.size == (w, h)
            np.testing.assert_array_equal(
                np.asarray(labels), expected_labels(model, config, root / "in" / name)
            )
        with Image.open(stem.with_name(stem.name + "_overlay.jpg")) as picture:
            assert picture.format == "JPEG" and picture.height >= h and picture.width > w  # legend


def test_predict_single_file_with_tta(setup, tmp_path):
    root, model, config = setup
    inference = Inference(mode="slide", crop_size=32, stride=24, flip=True)
    written = predict_images(
        model,
        root / "in" / "sub" / "b.jpg",
        tmp_path,
        class_names=config["dataset"]["class_names"],
        inference=inference,
        device="cpu",
    )
    assert written == [tmp_path / "b.png"]
    with Image.open(written[0]) as labels:
        assert labels.size == (29, 51)


def test_predict_refuses_bad_inputs(setup, tmp_path):
    model, names = setup[1], ["a"] * 5
    with pytest.raises(UserError, match="does not exist"):
        predict_images(model, tmp_path / "missing", tmp_path, class_names=names, device="cpu")
    (tmp_path / "twins").mkdir()
    for name in ("x.png", "x.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "twins" / name)
    with pytest.raises(UserError, match="would both be predicted into"):
        predict_images(model, tmp_path / "twins", tmp_path / "out", class_names=names, device="cpu")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "b.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="b.png"):
        predict_images(
            model, tmp_path / "broken", tmp_path / "out", class_names=names, device="cpu"
        )


def test_an_output_inside_the_input_folder_is_refused(setup, tmp_path):
    model, names = setup[1], ["a"] * 5
    Image.new("RGB", (9, 7)).save(tmp_path / "p.png")
    # Its label maps would be read as inputs by the next run, or replace inputs of that name.
    with pytest.raises(UserError, match=f"output={tmp_path / 'pred'} is inside the input folder"):
        predict_images(model, tmp_path, tmp_path / "pred", class_names=names, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_unreadable_checkpoint_is_one_sentence(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    Image.new("RGB", (9, 7)).save(tmp_path / "p.png")
    proc = run_script(
        "predict.py", f"checkpoint={tmp_path / 'bad.pt'}", f"input={tmp_path / 'p.png'}",
        f"output={tmp_path / 'out'}", "trainer.device=cpu",
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"predict.py: error: checkpoint {tmp_path / 'bad.pt'}"
    )


def test_predictor_gives_the_labels_predict_py_writes(setup, script_run):
    root = setup[0]
    assert script_run.returncode == 0, script_run.stderr[-3000:]
    predictor = fcnseg.Predictor(root / "model.pt", device="cpu")
    paths = [root / "in" / name for name in INPUTS]
    written = []
    for name in INPUTS:
        stem = (root / "out" / name).with_suffix("")
        with Image.open(stem.with_name(stem.name + ".png")) as labels:
            written.append(np.asarray(labels))
    for got, want in zip(predictor(paths), written):  # a list of paths
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
    # One image, as an array, a PIL image (RGBA, as stored) and the RGB array of the file.
    rgba = root / "in" / "a.png"
    with Image.open(rgba) as picture:
        np.testing.assert_array_equal(predictor(picture), written[0])
        np.testing.assert_array_equal(predictor(np.asarray(picture)), written[0])
    np.testing.assert_array_equal(predictor(read_image(rgba)), written[0])


def test_load_model_tells_what_the_model_expects(setup):
    root, _, config = setup
    ds = config["dataset"]
    info = fcnseg.load_model(root / "model.pt").info
    assert info == ModelInfo(
        class_names=tuple(ds["class_names"]),
        palette=tuple(tuple(int(c) for c in rgb) for rgb in palette(ds["num_classes"])),
        ignore_index=ds["ignore_index"],
        normalize=ds["normalize"],
        iteration=7,
        miou=None,  # the checkpoint never evaluated
    )
    assert info.num_classes == 5 and info.normalization.std == (0.229, 0.224, 0.225)


def test_channels_last_predicts_the_same_labels(setup, tmp_path):
    """NHWC is a memory layout, not another network: the labels are the ones computed here."""
    root, model, config = setup
    nhwc = Predictor(root / "model.pt", device="cpu", channels_last=True)
    conv = next(m for m in nhwc.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    out = tmp_path / "out"
    proc = run_script(
        "predict.py", f"checkpoint={root / 'model.pt'}", f"input={root / 'in'}",
        f"output={out}", "trainer.device=cpu", "trainer.channels_last=true",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in INPUTS:
        path = root / "in" / name
        expected = expected_labels(model, config, path)
        np.testing.assert_array_equal(nhwc(path), expected)
        written = out / Path(name).with_suffix(".png")
        np.testing.assert_array_equal(np.asarray(Image.open(written)), expected)


def test_predictor_tta_and_probabilities(setup):
    """Flip TTA averages the logits of the image and of its mirror image, mirrored back; the
    probabilities are their softmax, the labels their argmax."""
    root, model, config = setup
    image = read_image(root / "in" / "sub" / "b.jpg")
    x, _ = build_transforms(train=False, normalize=config["dataset"]["normalize"])(
        image, np.zeros(image.shape[:2], np.uint8)
    )
    with torch.no_grad():
        logits = (model(x[None]) + model(x[None].flip(-1)).flip(-1))[0] / 2
    info = fcnseg.load_model(root / "model.pt").info
    predictor = Predictor(model, info, inference=Inference(flip=True), device="cpu")
    labels, probs = predictor(image, probabilities=True)
    assert probs.shape == (5, *image.shape[:2]) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, logits.softmax(0).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(labels, logits.argmax(0).numpy())
    # Sliding windows smaller than the image, as evaluate.py's eval.mode=slide.
    slide = Predictor(model, info, inference=Inference(mode="slide", crop_size=32), device="cpu")
    assert slide(image).shape == image.shape[:2]


def test_predictor_refuses_what_it_cannot_read(setup):
    model = setup[1]
    with pytest.raises(UserError, match="has no ModelInfo"):
        Predictor(torch.nn.Identity())
    predictor = Predictor(model, ModelInfo.create(class_names="abcde"), device="cpu")
    with pytest.raises(UserError, match="must be uint8 of shape"):
        predictor(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(UserError, match="not an object of type int"):
        predictor(3)


# ------------------------------------------------------------------ photos turned by their EXIF
# Orientation 6: the viewer turns the stored pixels 90 degrees clockwise; 8: counter-clockwise.
TURN = {6: -1, 8: 1}  # np.rot90's k


def write_phone_photo(path, orientation):
    """A JPEG stored 160 wide and 96 high, shown 96 wide and 160 high (as a phone stores a
    portrait photo); returns its stored pixels, as decoded."""
    rng = np.random.default_rng(orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)).save(
        path, quality=95, exif=exif
    )
    stored = read_image(path)  # the datasets' reader: the pixels as stored
    assert stored.shape == (96, 160, 3)
    return stored


def labels_of(model, config, rgb):
    x, _ = build_transforms(train=False, normalize=config["dataset"]["normalize"])(
        np.ascontiguousarray(rgb), np.zeros(rgb.shape[:2], np.uint8)
    )
    with torch.no_grad():
        return model(x[None]).argmax(1)[0].numpy()


@pytest.mark.parametrize("orientation", sorted(TURN))
def test_predictor_sees_a_photo_as_viewers_show_it(setup, tmp_path, orientation):
    root, model, config = setup
    path = tmp_path / "phone.jpg"
    stored = write_phone_photo(path, orientation)
    shown = np.rot90(stored, k=TURN[orientation])
    with Image.open(path) as viewed:  # what a viewer shows: 96 wide, 160 high
        assert ImageOps.exif_transpose(viewed).size == (96, 160)
    expected = labels_of(model, config, shown)
    # The turned photo's labels are not the turned labels of the stored photo: the model saw it.
    assert not np.array_equal(
        expected, np.rot90(labels_of(model, config, stored), TURN[orientation])
    )
    predictor = fcnseg.Predictor(root / "model.pt", device="cpu")
    labels = predictor(path)
    assert labels.shape == (160, 96)
    np.testing.assert_array_equal(labels, expected)
    with Image.open(path) as picture:  # a PIL image opened from the file carries its EXIF
        np.testing.assert_array_equal(predictor(picture), expected)
    np.testing.assert_array_equal(predictor(stored), labels_of(model, config, stored))  # an array


def test_predict_script_writes_photos_as_viewers_show_them(setup, tmp_path):
    root, model, config = setup
    shown = {}
    for orientation in TURN:
        stored = write_phone_photo(tmp_path / "in" / f"o{orientation}.jpg", orientation)
        shown[orientation] = np.rot90(stored, k=TURN[orientation])
    proc = run_script(
        "predict.py", f"checkpoint={root / 'model.pt'}", f"input={tmp_path / 'in'}",
        f"output={tmp_path / 'out'}", "trainer.device=cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for orientation, rgb in shown.items():
        with Image.open(tmp_path / "out" / f"o{orientation}.png") as labels:
            assert labels.size == (96, 160)
            np.testing.assert_array_equal(np.asarray(labels), labels_of(model, config, rgb))
        with Image.open(tmp_path / "out" / f"o{orientation}_overlay.jpg") as picture:
            assert picture.height >= 160 and picture.width > 96  # the legend is on the right
            # Its photo part is the shown photo, blended (JPEG-coded) with the class colours.
            part = np.asarray(picture.convert("RGB"))[:160, :96].astype(float).ravel()
            assert np.corrcoef(part, rgb.astype(float).ravel())[0, 1] > 0.5
            assert abs(np.corrcoef(part, np.rot90(rgb, 2).astype(float).ravel())[0, 1]) < 0.2


# ---------------------------------------------------------------------- unreadable images
def checksums(folder):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def with_corrupt(tmp_path):
    """Good images a.png and c/d.jpg, around b.png (not an image) and c/e.jpg (empty)."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "in"
    (folder / "c").mkdir(parents=True)
    for name, (h, w) in {"a.png": (30, 41), "c/d.jpg": (37, 22)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "b.png").write_bytes(b"not an image, whatever its name says")
    (folder / "c" / "e.jpg").write_bytes(b"")
    return folder


def test_predict_reports_unreadable_images_and_predicts_the_others(setup, with_corrupt, tmp_path):
    root, model, config = setup
    before = checksums(with_corrupt)
    out = tmp_path / "out"
    proc = run_script(
        "predict.py", f"checkpoint={root / 'model.pt'}", f"input={with_corrupt}",
        f"output={out}", "trainer.device=cpu",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped: ")]
    assert skipped == [
        f"skipped: image {with_corrupt / 'b.png'} cannot be decoded (not an image format Pillow "
        "can read)",
        f"skipped: image {with_corrupt / 'c' / 'e.jpg'} is empty (0 bytes)",
    ]
    assert "2 unreadable image(s) skipped" in proc.stderr
    assert f"2 image(s) predicted into {out}" in proc.stdout
    assert sorted(str(p) for p in checksums(out)) == [
        "a.png", "a_overlay.jpg", "c/d.png", "c/d_overlay.jpg"
    ]  # fmt: skip
    for name in ("a.png", "c/d.jpg"):
        with Image.open((out / name).with_suffix(".png")) as labels:
            expected = labels_of(model, config, read_image(with_corrupt / name))
            np.testing.assert_array_equal(np.asarray(labels), expected)
    assert checksums(with_corrupt) == before


def test_predict_stops_at_the_first_unreadable_image_when_told(setup, with_corrupt, tmp_path):
    root = setup[0]
    out = tmp_path / "out"
    proc = run_script(
        "predict.py", f"checkpoint={root / 'model.pt'}", f"input={with_corrupt}",
        f"output={out}", "trainer.device=cpu", "skip_unreadable=false",
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"predict.py: error: image {with_corrupt / 'b.png'} cannot be decoded (not an image "
        "format Pillow can read); stopped there, after writing the label maps and overlays of "
        f"the 1 image(s) before it into {out} (the last a.png); pass skip_unreadable=true to "
        "skip such images"
    ]
    assert sorted(str(p) for p in checksums(out)) == ["a.png", "a_overlay.jpg"]
    names = ["a"] * 5
    with pytest.raises(UserError, match="; stopped there, before writing anything into"):
        predict_images(
            setup[1], with_corrupt / "b.png", tmp_path / "none", class_names=names, device="cpu"
        )
    assert not (tmp_path / "none").exists()
