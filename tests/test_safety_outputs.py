"""evaluate.py and predict.py never write among the files they read, nor into a folder that
already holds files unless told to; every refusal is one sentence, exit 2, before any work."""

from __future__ import annotations

import hashlib
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
        f"checkpoint {bare} has no 'config' entry with the training configuration; it is not an "
        "fcnseg training checkpoint"
    )
    proc = run_script("evaluate.py", f"checkpoint={bare}", *CPU, cwd=tmp_path)
    assert one_sentence(proc, "evaluate.py") == f"evaluate.py: error: {expected}"
    proc = run_script(
        "predict.py", f"checkpoint={bare}", f"input={tmp_path / 'photo.png'}",
        f"output={tmp_path / 'out'}", "trainer.device=cpu", cwd=tmp_path,
    )  # fmt: skip
    assert one_sentence(proc, "predict.py") == f"predict.py: error: {expected}"
    assert not (tmp_path / "out").exists()


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
