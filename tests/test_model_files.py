"""Model files are data: nothing a checkpoint or an exported model names is imported or called
unless fcnseg registers it, the model is rebuilt from a versioned description that does not
depend on the config tree, and files written by earlier versions keep loading and predicting
the same labels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image

import fcnseg
from fcnseg.data.trusted import dataset_builder
from fcnseg.errors import UserError
from fcnseg.models.builder import build_from_description, build_model
from fcnseg.models.description import KEY, ModelDescription, describe
from fcnseg.models.loading import load_trained

V0 = Path(__file__).parent / "data" / "model_files" / "v0"
CPU = ["trainer.device=cpu", "trainer.num_workers=0"]
# Callables that write files or run commands, as a hostile file would name them.
ATTACKS = ("numpy.savetxt", "os.system", "builtins.exec", "pathlib.Path.write_text")


def tree(root: Path) -> dict[str, str]:
    """Every file below ``root`` by SHA-256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def v0_checkpoint() -> dict:
    return torch.load(V0 / "fcn8s_vgg_tiny.pt", weights_only=True)


def savetxt_node(target: Path) -> dict:
    """The reported exploit: a builder node that writes ``target`` when instantiated."""
    return {"_target_": "numpy.savetxt", "fname": str(target), "X": ["echo owned"], "fmt": "%s"}


def refused(proc, *words: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert "evaluating" not in proc.stdout + proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------- hostile files
def test_hostile_dataset_builder_in_checkpoint_is_refused_by_evaluate(tmp_path):
    owned = tmp_path / "owned.txt"
    ckpt = v0_checkpoint()
    ckpt["config"]["dataset"]["builder"] = savetxt_node(owned)
    torch.save(ckpt, tmp_path / "best.pt")
    before = tree(tmp_path)
    proc = run_script("evaluate.py", f"checkpoint={tmp_path / 'best.pt'}", *CPU, cwd=tmp_path)
    refused(proc, "dataset.builder._target_", "numpy.savetxt")
    assert not owned.exists() and tree(tmp_path) == before


def test_hostile_dataset_builder_in_onnx_metadata_is_refused_by_evaluate(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    owned = tmp_path / "owned.txt"
    graph = onnx.load(str(V0 / "fcn8s_vgg_tiny.onnx"))
    meta = {p.key: p for p in graph.metadata_props}
    config = json.loads(meta["config"].value)
    config["dataset"]["builder"] = savetxt_node(owned)
    meta["config"].value = json.dumps(config)
    onnx.save(graph, str(tmp_path / "model.onnx"))
    before = tree(tmp_path)
    proc = run_script(
        "evaluate.py", "runtime=onnx", f"model={tmp_path / 'model.onnx'}", *CPU, cwd=tmp_path
    )
    refused(proc, "dataset.builder._target_", "numpy.savetxt")
    assert not owned.exists() and tree(tmp_path) == before


@pytest.mark.parametrize("target", ATTACKS)
@pytest.mark.parametrize(
    "where",
    ["builder", "nested", "list"],
)
def test_dataset_builder_refuses_every_foreign_name(tmp_path, target, where):
    owned = tmp_path / "owned.txt"
    node = dict(v0_checkpoint()["config"]["dataset"]["builder"])
    attack = {**savetxt_node(owned), "_target_": target}
    if where == "builder":
        node["_target_"] = target
    elif where == "nested":
        node["root"] = attack
    else:
        node["num_samples"] = {"val": [1, attack]}
    with pytest.raises(UserError, match="nothing|not allowed") as err:
        dataset_builder(node, source="best.pt")(split="val", transform=None)
    assert "best.pt" in str(err.value) and not owned.exists()


def test_dataset_builder_refuses_hydra_keys_and_never_downloads():
    node = dict(v0_checkpoint()["config"]["dataset"]["builder"])
    with pytest.raises(UserError, match=r"dataset.builder._args_"):
        dataset_builder({**node, "_args_": ["x"]}, source="f")
    camvid = {"_target_": "fcnseg.data.CamVid", "root": "/r", "download": True}
    assert dataset_builder(camvid, source="f").keywords["download"] is False
    assert dataset_builder(camvid, source="f", download=True).keywords["download"] is True


@pytest.mark.parametrize(
    "edit",
    [
        ("config", "backbone", "os.system"),
        ("config", "head", "builtins.exec"),
        ("config", "backbone", "fcnseg.models.backbones.weights.load_pretrained"),
        ("description", "backbone", "os.system"),
        ("description", "head", "ResNet"),  # a class, not a registered builder
    ],
)
def test_checkpoint_naming_anything_but_fcnseg_builders_is_refused(tmp_path, edit):
    where, kind, name = edit
    ckpt = v0_checkpoint()
    if where == "config":
        ckpt["config"][kind]["_target_"] = name
    else:
        description = ModelDescription.from_config(ckpt["config"], source="x").to_dict()
        description[kind]["name"] = name
        ckpt[KEY] = description
    torch.save(ckpt, tmp_path / "best.pt")
    with pytest.raises(UserError, match=f"{kind}.*{name}.*nothing was loaded"):
        fcnseg.load_model(tmp_path / "best.pt")


@pytest.mark.parametrize("value", [{"_target_": "numpy.savetxt"}, [1, {"x": 2}], float("nan")])
def test_checkpoint_option_that_is_not_a_plain_value_is_refused(tmp_path, value):
    ckpt = v0_checkpoint()
    description = ModelDescription.from_config(ckpt["config"], source="x").to_dict()
    description["head"]["options"]["evil"] = value
    ckpt[KEY] = description
    torch.save(ckpt, tmp_path / "best.pt")
    with pytest.raises(UserError, match="head options: evil=.*not a plain value"):
        fcnseg.load_model(tmp_path / "best.pt")


def test_onnx_description_naming_foreign_code_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fcnseg.deploy import load_onnx

    graph = onnx.load(str(V0 / "fcn8s_vgg_tiny.onnx"))
    config = json.loads(next(p.value for p in graph.metadata_props if p.key == "config"))
    description = ModelDescription.from_config(config, source="x").to_dict()
    description["backbone"]["name"] = "os.system"
    graph.metadata_props.add(key=KEY, value=json.dumps(description))
    onnx.save(graph, str(tmp_path / "model.onnx"))
    with pytest.raises(UserError, match="backbone 'os.system' is not one of fcnseg's"):
        load_onnx(tmp_path / "model.onnx")


def test_onnx_whose_outputs_disagree_with_its_classes_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fcnseg.deploy import load_onnx

    graph = onnx.load(str(V0 / "fcn8s_vgg_tiny.onnx"))  # 5 output channels
    meta = {p.key: p for p in graph.metadata_props}
    config = json.loads(meta["config"].value)
    names = config["dataset"]["class_names"][:4]
    config["dataset"].update(class_names=names, num_classes=4)
    meta["config"].value = json.dumps(config)
    meta["class_names"].value = json.dumps(names)
    onnx.save(graph, str(tmp_path / "model.onnx"))
    with pytest.raises(UserError, match="outputs 5 classes but its metadata name 4"):
        load_onnx(tmp_path / "model.onnx")


# ---------------------------------------------------------------------------- versions
@pytest.mark.parametrize("name", ["fcn8s_vgg_tiny.pt", "segnet_vgg_tiny.pt", "fcn8s_vgg_tiny.onnx"])
def test_files_of_version_0_load_and_predict_the_same_labels(name):
    if name.endswith(".onnx"):
        pytest.importorskip("onnxruntime")
    expected = np.load(V0 / "expected.npz")
    key = name.replace(".", "_")
    labels, probs = fcnseg.Predictor(V0 / name)(
        np.asarray(Image.open(V0 / "image.png")), probabilities=True
    )
    np.testing.assert_array_equal(np.asarray(labels), expected[f"{key}_labels"])
    np.testing.assert_allclose(np.asarray(probs), expected[f"{key}_probabilities"], atol=1e-5)


def test_file_of_version_0_evaluates_on_its_own_dataset(tmp_path):
    proc = run_script("evaluate.py", f"checkpoint={V0 / 'fcn8s_vgg_tiny.pt'}", *CPU, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mIoU" in proc.stdout


def test_version_1_is_independent_of_the_config_tree(tmp_path):
    """A checkpoint with a description loads whatever its config's targets say (a renamed
    config group, a moved class), and rebuilds the same network."""
    ckpt = v0_checkpoint()
    model, _ = load_trained(V0 / "fcn8s_vgg_tiny.pt")
    ckpt[KEY] = model.description.to_dict()
    ckpt["config"]["backbone"] = {"_target_": "fcnseg.models.somewhere_else.vgg_tiny"}
    ckpt["config"]["head"] = {"_target_": "gone"}
    torch.save(ckpt, tmp_path / "best.pt")
    again, _ = load_trained(tmp_path / "best.pt")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert again.info == model.info


def test_description_round_trips_and_is_written_by_build_model():
    model = build_model(
        backbone="vgg_tiny", head="fcn16s", num_classes=3, backbone_options={"fc_channels": 16}
    )
    description = describe(model, class_names=["a", "b", "c"], palette=[[1, 2, 3]] * 3)
    data = json.loads(json.dumps(description.to_dict()))
    assert data["version"] == 1 and data["backbone"] == {
        "name": "vgg_tiny",
        "options": {"fc_channels": 16},
    }
    again = ModelDescription.from_dict(data, source="x")
    assert again == description
    rebuilt = build_from_description(again)
    assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == [
        (k, v.shape) for k, v in model.state_dict().items()
    ]


def test_description_of_a_newer_version_says_so():
    data = {"version": 99, "backbone": {"name": "vgg_tiny"}, "head": {"name": "fcn8s"}}
    with pytest.raises(UserError, match="version 99 .* upgrade fcnseg"):
        ModelDescription.from_dict(data, source="x")


def test_an_onnx_file_given_as_checkpoint_says_how_to_run_it():
    with pytest.raises(UserError, match=r"is an exported ONNX model, not a checkpoint; run it with "
                       r"runtime=onnx model=.*fcn8s_vgg_tiny.onnx"):  # fmt: skip
        fcnseg.load_model(V0 / "fcn8s_vgg_tiny.onnx")


# ---------------------------------------------------------------------------- opening
@pytest.mark.parametrize(
    ("name", "renamed", "kind"),
    [("fcn8s_vgg_tiny.pt", "weights.onnx", "torch"), ("fcn8s_vgg_tiny.onnx", "model.pt", "onnx")],
)
def test_open_model_goes_by_the_files_content_not_its_name(tmp_path, name, renamed, kind):
    """A checkpoint named ``.onnx`` and an exported model named ``.pt`` open in their own
    runtime and predict the labels their original files were written with."""
    pytest.importorskip("onnxruntime")
    from fcnseg.deploy import OnnxModel, open_model

    path = tmp_path / renamed
    path.write_bytes((V0 / name).read_bytes())
    model, record = open_model(path)
    assert isinstance(model, OnnxModel) == (kind == "onnx")
    if kind == "torch":  # the classes as the file itself stores them
        names = torch.load(V0 / name, weights_only=True)["config"]["dataset"]["class_names"]
    else:
        onnx = pytest.importorskip("onnx")
        meta = {p.key: p.value for p in onnx.load(str(V0 / name)).metadata_props}
        names = json.loads(meta["class_names"])
    assert list(model.info.class_names) == names
    assert record["config"]["dataset"]["class_names"] == names
    labels = fcnseg.Predictor(model)(np.asarray(Image.open(V0 / "image.png")))
    expected = np.load(V0 / "expected.npz")[f"{name.replace('.', '_')}_labels"]
    np.testing.assert_array_equal(labels, expected)


def test_open_model_refuses_a_file_given_to_the_other_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    from fcnseg.deploy import load_for_inference, open_model

    ckpt = V0 / "fcn8s_vgg_tiny.pt"
    said = r"is a PyTorch checkpoint, not an exported ONNX model; run it with runtime=torch "
    said += r"checkpoint=.*fcn8s_vgg_tiny.pt"
    for call in (
        lambda: open_model(ckpt, runtime="onnx"),
        lambda: load_for_inference(runtime="onnx", model=ckpt),
    ):
        with pytest.raises(UserError, match=said):
            call()
    with pytest.raises(UserError, match=r"not a checkpoint; run it with runtime=onnx model="):
        open_model(V0 / "fcn8s_vgg_tiny.onnx", runtime="torch")
    with pytest.raises(UserError, match=r"^runtime=tensorrt is not one of torch, onnx$"):
        open_model(ckpt, runtime="tensorrt")
    with pytest.raises(UserError, match=r"checkpoint .*none\.pt does not exist"):
        open_model(tmp_path / "none.pt")
    with pytest.raises(UserError, match=r"none\.onnx does not exist or is not a file"):
        open_model(tmp_path / "none.onnx")
