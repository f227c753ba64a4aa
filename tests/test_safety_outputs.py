"""evaluate.py and predict.py never write among the files they read, nor over a file or into a
folder that already holds files unless told to; every refusal is one sentence, exit 2, before
any work."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import fixtures as fx
import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image
from test_evaluate import make_checkpoint

from fcnseg.data import CamVid
from fcnseg.data.predictions import PredictionWriter
from fcnseg.engine.predictor import check_prediction_paths, predict_images
from fcnseg.errors import UserError
from fcnseg.utils.outputs import check_evaluation_outputs, write_json

CPU = ["trainer.device=cpu", "trainer.num_workers=0"]


def tree(root: Path) -> dict[str, str]:
    """Every file (by SHA-256) and folder below ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def camvid(tmp_path_factory):
    """A CamVid folder and a checkpoint trained on it (as the user's, whose ground truth an
    evaluation once replaced)."""
    base = tmp_path_factory.mktemp("camvid")
    root = fx.write_camvid(base / "CamVid")
    model, _ = make_checkpoint(base / "model.pt", "dataset=camvid", f"dataset.root={root}", data=())
    return base, root, model


def one_sentence(proc, script: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def not_started(proc) -> None:
    """The refusal came before the evaluation: nothing was evaluated."""
    assert "evaluating" not in proc.stdout + proc.stderr
    assert "mIoU" not in proc.stdout


def test_evaluate_refuses_to_save_predictions_into_the_dataset(camvid):
    base, root, _ = camvid
    before = tree(root)
    proc = run_script(
        "evaluate.py", f"checkpoint={base / 'model.pt'}", *CPU,
        f"eval.save_predictions={root / 'valannot'}", "eval.overwrite=true", cwd=base,
    )  # fmt: skip
    assert one_sentence(proc, "evaluate.py") == (
        f"evaluate.py: error: eval.save_predictions={root / 'valannot'} is inside the dataset "
        f"folder {root}, whose files must not be overwritten; choose a folder outside it"
    )
    not_started(proc)
    assert tree(root) == before  # every photo and ground-truth PNG as it was


def test_prediction_writer_keeps_out_of_every_dataset_folder(camvid, tmp_path):
    root = camvid[1]
    dataset = CamVid(root=root, split="val")
    before = tree(root)
    for target, relation in (
        (root, "is"),
        (root / "val", "is inside"),  # the photos
        (root / "valannot", "is inside"),  # the ground truth
        (root / "test", "is inside"),  # another split's folder
        (root / "predictions", "is inside"),  # a new folder inside the root
        (root.parent, "contains"),
    ):
        with pytest.raises(UserError, match=f"={target} {relation} the dataset folder") as err:
            PredictionWriter(target, dataset=dataset, overwrite=True)
        assert "\n" not in str(err.value)
    # A symbolic link to the labels is the labels.
    (tmp_path / "link").symlink_to(root / "valannot")
    with pytest.raises(UserError, match="is inside the dataset folder"):
        PredictionWriter(tmp_path / "link", dataset=dataset, overwrite=True)
    assert tree(root) == before and not (root / "predictions").exists()
    PredictionWriter(tmp_path / "fresh", dataset=dataset)  # anywhere else is fine


def test_evaluate_refuses_a_non_empty_folder_unless_told(camvid, tmp_path):
    base = camvid[0]
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "notes.txt").write_text("mine")
    (pred / "0001TP_006690.png").write_bytes(b"an earlier result")
    before = tree(pred)
    args = ["evaluate.py", f"checkpoint={base / 'model.pt'}", *CPU, f"eval.save_predictions={pred}"]
    line = one_sentence(run_script(*args, cwd=tmp_path), "evaluate.py")
    assert line == (
        f"evaluate.py: error: eval.save_predictions={pred} is not empty; choose an empty or new "
        "folder, or pass eval.overwrite=true to replace the files of the same name in it"
    )
    assert tree(pred) == before
    proc = run_script(*args, "eval.overwrite=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (pred / "notes.txt").read_text() == "mine"  # other files stay
    names = sorted(p.name for p in (camvid[1] / "val").iterdir())
    assert sorted(p.name for p in pred.iterdir()) == sorted([*names, "notes.txt"])
    with Image.open(pred / names[0]) as image:  # the earlier result was replaced by a label map
        assert image.mode == "P"


def test_evaluate_refuses_out_as_a_folder_before_evaluating(camvid, tmp_path):
    (tmp_path / "metrics").mkdir()
    proc = run_script(
        "evaluate.py", f"checkpoint={camvid[0] / 'model.pt'}", *CPU, f"out={tmp_path / 'metrics'}",
        cwd=tmp_path,
    )  # fmt: skip
    line = one_sentence(proc, "evaluate.py")
    assert (
        line
        == f"evaluate.py: error: out={tmp_path / 'metrics'} is a folder; give the file to write"
    )
    not_started(proc)
    assert not list((tmp_path / "metrics").iterdir())


def test_evaluate_names_an_unknown_split_and_the_known_ones(camvid, tmp_path):
    base, root, _ = camvid
    proc = run_script("evaluate.py", f"checkpoint={base / 'model.pt'}", *CPU, "split=tset")
    line = one_sentence(proc, "evaluate.py")
    assert line.startswith(f"evaluate.py: error: CamVid folder {root / 'tset'} does not exist")
    assert line.endswith(f"; {root} holds the splits test, train, val")


def test_checkpoint_without_config_is_one_sentence(camvid, tmp_path):
    base = camvid[0]
    bare = tmp_path / "weights.pt"
    torch.save({"model": torch.load(base / "model.pt", weights_only=True)["model"]}, bare)
    Image.new("RGB", (8, 6)).save(tmp_path / "photo.png")
    expected = (
        f"{bare} has no model description (no 'model_description' or 'config' entry); it is not "
        "an fcnseg checkpoint"
    )
    proc = run_script("evaluate.py", f"checkpoint={bare}", *CPU, cwd=tmp_path)
    assert one_sentence(proc, "evaluate.py") == f"evaluate.py: error: {expected}"
    proc = run_script(
        "predict.py", f"checkpoint={bare}", f"input={tmp_path / 'photo.png'}",
        f"output={tmp_path / 'out'}", "trainer.device=cpu", cwd=tmp_path,
    )  # fmt: skip
    assert one_sentence(proc, "predict.py") == f"predict.py: error: {expected}"
    assert not (tmp_path / "out").exists()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate(camvid, *args, cwd):
    return run_script("evaluate.py", f"checkpoint={camvid[0] / 'model.pt'}", *CPU, *args, cwd=cwd)


def test_evaluate_replaces_an_existing_out_file_only_when_told(camvid, tmp_path):
    out = tmp_path / "metrics.json"
    out.write_text('{"my": "earlier results"}')
    before = sha(out)
    proc = evaluate(camvid, f"out={out}", cwd=tmp_path)
    assert one_sentence(proc, "evaluate.py") == (
        f"evaluate.py: error: out={out} exists; pass eval.overwrite=true to replace it"
    )
    not_started(proc)
    assert sha(out) == before
    proc = evaluate(camvid, f"out={out}", "eval.overwrite=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics["num_images"] == len(list((camvid[1] / "val").iterdir()))
    # Written through a temporary file renamed over it: nothing else is left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_evaluate_never_writes_over_the_checkpoint_even_when_told(camvid, tmp_path):
    """The checkpoint, under its own name, through a symbolic and a hard link named .json, and
    inside a folder of predictions: refused with eval.overwrite=true."""
    checkpoint = camvid[0] / "model.pt"
    before = sha(checkpoint)
    proc = evaluate(camvid, f"out={checkpoint}", "eval.overwrite=true", cwd=tmp_path)
    assert one_sentence(proc, "evaluate.py") == (
        f"evaluate.py: error: out={checkpoint} is the file given as checkpoint=, which is read, "
        "never written; choose another file"
    )
    not_started(proc)
    (tmp_path / "soft.json").symlink_to(checkpoint)
    os.link(checkpoint, tmp_path / "hard.json")
    dataset = CamVid(root=camvid[1], split="val")
    for name in ("soft.json", "hard.json"):
        with pytest.raises(UserError, match=f"^out={tmp_path / name} is the file given as check"):
            check_evaluation_outputs(
                dataset, out=tmp_path / name, overwrite=True, read={"checkpoint": checkpoint}
            )
    for key in ("save_predictions", "tensorboard"):
        with pytest.raises(
            UserError, match=f"^eval.{key}={camvid[0]} contains the file given as checkpoint="
        ):
            check_evaluation_outputs(
                dataset, **{key: camvid[0]}, overwrite=True, read={"checkpoint": checkpoint}
            )
    assert sha(checkpoint) == before


@pytest.mark.slow
def test_evaluate_never_writes_over_the_exported_model(camvid, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fcnseg.deploy.export import export_onnx
    from fcnseg.models.loading import load_trained

    model, ckpt = load_trained(camvid[0] / "model.pt")
    onnx_file = export_onnx(model, tmp_path / "model.onnx", info=model.info, config=ckpt["config"])
    before = sha(onnx_file)
    proc = run_script(
        "evaluate.py", "runtime=onnx", f"model={onnx_file}", f"out={onnx_file}",
        "eval.overwrite=true", *CPU, cwd=tmp_path,
    )  # fmt: skip
    assert one_sentence(proc, "evaluate.py") == (
        f"evaluate.py: error: out={onnx_file} is the file given as model=, which is read, never "
        "written; choose another file"
    )
    not_started(proc)
    assert sha(onnx_file) == before


def test_evaluate_never_writes_over_a_dataset_file_even_when_told(camvid, tmp_path):
    root = camvid[1]
    photo = sorted((root / "val").iterdir())[0]
    before = tree(root)
    proc = evaluate(camvid, f"out={photo}", "eval.overwrite=true", cwd=tmp_path)
    assert one_sentence(proc, "evaluate.py") == (
        f"evaluate.py: error: out={photo} is inside the dataset folder {root}, whose files must "
        "not be overwritten; choose a folder outside it"
    )
    not_started(proc)
    dataset = CamVid(root=root, split="val")
    for key, path in (("out", root / "metrics.json"), ("eval.grid", root / "grid.png")):
        with pytest.raises(UserError, match=f"^{key}={path} is inside the dataset folder"):
            check_evaluation_outputs(
                dataset, **{"out" if key == "out" else "grid": path}, overwrite=True
            )
    assert tree(root) == before


def test_evaluate_refuses_an_existing_grid_and_a_grid_it_cannot_write(camvid, tmp_path):
    grid = tmp_path / "grid.png"
    Image.new("RGB", (4, 3), (200, 10, 10)).save(grid)
    before = sha(grid)
    proc = evaluate(camvid, f"eval.grid={grid}", cwd=tmp_path)
    assert one_sentence(proc, "evaluate.py") == (
        f"evaluate.py: error: eval.grid={grid} exists; pass eval.overwrite=true to replace it"
    )
    not_started(proc)
    assert sha(grid) == before
    # The name the user once gave: refused before the evaluation, nothing written.
    proc = evaluate(
        camvid, f"eval.grid={tmp_path / 'grid.onnx'}", f"out={tmp_path / 'm.json'}", cwd=tmp_path
    )
    assert one_sentence(proc, "evaluate.py") == (
        f"evaluate.py: error: eval.grid={tmp_path / 'grid.onnx'} is not a picture file name "
        "Pillow writes (.onnx); name a .png or .jpg file"
    )
    not_started(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (
            {"out": "m.txt"},
            "out={t}/m.txt is not a .json file name; the metrics are written as JSON",
        ),
        ({"grid": "g"}, "eval.grid={t}/g is not a picture file name Pillow writes (no extension)"),
        ({"out": "file/m.json"}, "out={t}/file/m.json cannot be created: {t}/file is a file, not"),
        ({"tensorboard": "full"}, "eval.tensorboard={t}/full is not empty; choose an empty or new"),
        ({"tensorboard": "file"}, "eval.tensorboard={t}/file is a file, not a folder"),
        ({"save_predictions": "full"}, "eval.save_predictions={t}/full is not empty; choose"),
        ({"save_predictions": "p", "grid": "p/g.png"}, "eval.grid={t}/p/g.png is inside eval.save"),
        ({"tensorboard": "x", "save_predictions": "x"}, "eval.tensorboard={t}/x is also eval.save"),
    ],
)
def test_evaluation_outputs_are_checked_by_name_and_type(camvid, tmp_path, outputs, message):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    dataset = CamVid(root=camvid[1], split="val")
    paths = {key: tmp_path / name for key, name in outputs.items()}
    with pytest.raises(UserError) as err:
        check_evaluation_outputs(dataset, **paths)
    assert str(err.value).startswith(message.format(t=tmp_path))
    assert tree(tmp_path) == before


def test_evaluation_outputs_that_are_fine(camvid, tmp_path):
    dataset = CamVid(root=camvid[1], split="val")
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.out.tfevents.1").write_bytes(b"earlier")
    (tmp_path / "old.JSON").write_text("{}")
    for grid in ("g.png", "g.JPG", "g.jpeg", "g.bmp", "g.tif", "g.webp"):
        check_evaluation_outputs(dataset, grid=tmp_path / "new" / grid)  # folders are made
    check_evaluation_outputs(
        dataset, out=tmp_path / "old.JSON", tensorboard=tmp_path / "tb", overwrite=True
    )


def test_write_json_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("another program's")
    with pytest.raises(UserError, match=f"^out={path} appeared while this ran; it is kept"):
        write_json({"miou": 0.5}, path)
    assert path.read_text() == "another program's"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left
    write_json({"miou": 0.5}, path, overwrite=True)
    assert json.loads(path.read_text()) == {"miou": 0.5}
    write_json([1, 2], tmp_path / "new" / "n.json")
    assert json.loads((tmp_path / "new" / "n.json").read_text()) == [1, 2]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.json", "n.json", "new"]


def test_prediction_writer_refuses_two_images_of_one_name(tmp_path):
    class TwoFolders:
        images = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "y.jpg", tmp_path / "b" / "x.png"]

        def __len__(self):
            return len(self.images)

    with pytest.raises(UserError) as err:
        PredictionWriter(tmp_path / "pred", dataset=TwoFolders())
    assert str(err.value) == (
        f"eval.save_predictions={tmp_path / 'pred'} would receive the predictions of "
        f"{tmp_path / 'a' / 'x.jpg'} and {tmp_path / 'b' / 'x.png'} under one name, x.png, as "
        "predictions are named after the image file alone"
    )
    assert not (tmp_path / "pred").exists()


# ------------------------------------------------------------------------------- predict.py
@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            tmp_path / "photos" / name
        )
    return tmp_path / "photos"


def predict(camvid, *args, cwd):
    return run_script(
        "predict.py", f"checkpoint={camvid[0] / 'model.pt'}", "trainer.device=cpu", *args, cwd=cwd
    )


def test_predict_refuses_an_output_among_its_inputs(camvid, photos):
    """The input folder itself (which once printed "0 image(s) predicted" and exit 0), a
    folder inside it, and a folder that contains it."""
    parent = photos.parent
    before = tree(parent)
    proc = predict(camvid, f"input={photos}", f"output={photos}", "overwrite=true", cwd=parent)
    assert one_sentence(proc, "predict.py") == (
        f"predict.py: error: output={photos} is the input folder {photos}, whose files must not "
        "be overwritten; choose a folder outside it"
    )
    for output, relation in ((photos / "sub", "is inside"), (parent, "contains")):
        with pytest.raises(UserError, match=f"^output={output} {relation} the input folder"):
            check_prediction_paths(photos, output, overwrite=True)
    with pytest.raises(UserError, match=f"^output={parent} contains the input image"):
        check_prediction_paths(photos / "a.png", parent, overwrite=True)
    assert tree(parent) == before


def test_predict_refuses_an_output_that_is_a_file(camvid, photos, tmp_path):
    target = tmp_path / "result.png"
    target.write_bytes(b"keep me")
    proc = predict(camvid, f"input={photos}", f"output={target}", cwd=tmp_path)
    assert one_sentence(proc, "predict.py") == (
        f"predict.py: error: output={target} is a file, not a folder; give a folder for the outputs"
    )
    assert target.read_bytes() == b"keep me"


def test_predict_into_a_non_empty_folder_needs_overwrite(camvid, photos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"an earlier result")
    (out / "notes.txt").write_text("mine")
    proc = predict(camvid, f"input={photos}", f"output={out}", cwd=tmp_path)
    assert one_sentence(proc, "predict.py") == (
        f"predict.py: error: output={out} is not empty; choose an empty or new folder, or pass "
        "overwrite=true to replace the files of the same name in it"
    )
    assert (out / "a.png").read_bytes() == b"an earlier result"
    model, names = camvid[2], list(CamVid.class_names)
    written = predict_images(model, photos, out, class_names=names, device="cpu", overwrite=True)
    assert written == [out / "a.png", out / "sub" / "b.png"]
    assert (out / "notes.txt").read_text() == "mine"  # files of other names stay
    with Image.open(out / "a.png") as image:
        assert image.mode == "P" and image.size == (24, 20)
