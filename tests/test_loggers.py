"""Experiment logs: the logger group's composition, RUN/metrics.csv and an MLflow run, each
checked against what the trainer computed, across a crash and a resume."""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_config, train_settings
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_resume import NUM_CLASSES, one_thread, tiny_model  # noqa: F401 - fixture
from torch.utils.data import Dataset

from fcnseg.data import SyntheticShapes, build_transforms
from fcnseg.engine.evaluator import run_evaluation
from fcnseg.engine.loggers import CSVLogger, MLflowLogger, TensorBoardLogger
from fcnseg.engine.loss import SegLoss
from fcnseg.engine.record import RunRecord
from fcnseg.engine.trainer import Trainer
from fcnseg.errors import UserError

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
CONFIG = {"trainer": {"max_iters": 6, "seed": 0}, "dataset": {"class_names": ["a", "b"]}}


class FailAt(Dataset):
    """``dataset``, failing on fetch number ``at``: a run that crashes mid-training."""

    def __init__(self, dataset: Dataset, at: int) -> None:
        self.dataset, self.at, self.fetches = dataset, at, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        self.fetches += 1
        if self.fetches == self.at:
            raise OSError("the disk went away")
        return self.dataset[key]


def tiny_run(run_dir, loggers, *, resume=False, fail_at=None) -> Trainer:
    """6 iterations of vgg_tiny FCN-8s on 32-px synthetic crops, evaluated (and last.pt
    written) at 3 and 6; ``fail_at``: the training fetch that crashes."""
    tf, val_tf = build_transforms(train=True, crop_size=32), build_transforms(train=False)
    shapes = functools.partial(SyntheticShapes, min_size=32, max_size=40)
    train_set = shapes(split="train", num_samples=8, transform=tf)
    trainer = Trainer(
        train_settings(
            max_iters=6, eval_interval=3, log_interval=1, checkpoint_interval=3, batch_size=2,
            num_workers=0, device="cpu", num_vis=1, resume=resume,
        ),
        model=tiny_model(),
        train_set=train_set if fail_at is None else FailAt(train_set, fail_at),
        val_set=shapes(split="val", num_samples=2, transform=val_tf),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        scheduler=functools.partial(torch.optim.lr_scheduler.PolynomialLR, total_iters=6),
        loss=SegLoss(), run_dir=run_dir, loggers=loggers,
        record=RunRecord(class_names=[f"c{i}" for i in range(NUM_CLASSES)], config=CONFIG),
    )  # fmt: skip
    trainer.fit()
    return trainer


def read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    # What pandas.read_csv needs to read it as is: one field per column in every row.
    assert all(None not in row and None not in row.values() for row in rows)
    return list(reader.fieldnames), rows


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    """A run that crashes while loading iteration 6's batch (last.pt at 3, iterations 4 and
    5 logged), then the same run resumed to the end; what the loggers hold."""
    root = tmp_path_factory.mktemp("logs")
    run_dir = root / "run"
    loggers = [TensorBoardLogger, CSVLogger]
    if HAS_MLFLOW:
        loggers.append(functools.partial(MLflowLogger, tracking_uri=str(root / "mlruns")))
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        with pytest.raises(OSError, match="the disk went away"):
            tiny_run(run_dir, loggers, fail_at=11)  # 2 images a step: fetch 11 is in step 6
        crashed = read_csv(run_dir / "metrics.csv")
        mlflow_run = json.loads((run_dir / "mlflow.json").read_text()) if HAS_MLFLOW else None
        tiny_run(run_dir, loggers, resume=True)
    return run_dir, crashed, mlflow_run


def test_the_logger_group_selects_several_backends():
    def chosen(*overrides):
        nodes = compose_config(list(overrides)).get("logger") or {}
        return [instantiate(node).func for node in nodes.values()]

    assert chosen() == [TensorBoardLogger]  # the default
    assert chosen("logger=[tensorboard,csv]") == [TensorBoardLogger, CSVLogger]
    assert chosen("+logger=csv") == [TensorBoardLogger, CSVLogger]  # added to the default
    assert chosen("logger=[csv,mlflow]") == [CSVLogger, MLflowLogger]
    assert chosen("logger=[]") == []


def test_csv_rows_are_the_logged_iterations_once_each_across_a_resume(crashed_and_resumed):
    run_dir, (_, crashed), _ = crashed_and_resumed
    assert [row["iteration"] for row in crashed] == ["1", "2", "3", "4", "5"]  # last.pt: 3
    columns, rows = read_csv(run_dir / "metrics.csv")
    assert [row["iteration"] for row in rows] == ["1", "2", "3", "4", "5", "6"]
    assert columns[:7] == [
        "iteration", "train/loss", "train/lr", "val/miou", "val/pixel_acc", "val/mean_acc",
        "val/fwiou",
    ]  # fmt: skip
    # The resume is exact: iterations 4 and 5 are computed again to the same values.
    assert rows[:5] == crashed
    assert [bool(row["val/miou"]) for row in rows] == [False, False, True, False, False, True]


def test_csv_values_are_those_of_the_log_and_metrics_json(crashed_and_resumed):
    run_dir, _, _ = crashed_and_resumed
    _, rows = read_csv(run_dir / "metrics.csv")
    logged = [  # "iteration 3/6: loss 1.2345, lr ..." in train.log, both runs
        line.split("iteration ")[1].split(", lr")[0]
        for line in (run_dir / "train.log").read_text().splitlines()
        if "/6: loss" in line
    ]
    steps = {int(entry.split("/")[0]): float(entry.split("loss ")[1]) for entry in logged}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for row in rows:
        assert float(row["train/loss"]) == pytest.approx(steps[int(row["iteration"])], abs=1e-4)
    last = json.loads((run_dir / "metrics.json").read_text())
    for key in ("miou", "pixel_acc", "mean_acc", "fwiou"):
        assert float(rows[-1][f"val/{key}"]) == last[key]
    for name, iou in zip(last["class_names"], last["iou"]):
        assert rows[-1].get(f"val/iou/{name}", "") == ("" if iou is None else repr(iou))


def test_csv_and_tensorboard_hold_the_same_scalars(crashed_and_resumed):
    run_dir, _, _ = crashed_and_resumed
    columns, rows = read_csv(run_dir / "metrics.csv")
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(columns[1:])
    for tag in columns[1:]:
        events = [(e.step, e.value) for e in acc.Scalars(tag)]  # one per step: purged on resume
        expected = [(int(r["iteration"]), float(r[tag])) for r in rows if r[tag]]
        assert [s for s, _ in events] == [s for s, _ in expected], tag
        assert [v for _, v in events] == pytest.approx([v for _, v in expected], rel=1e-6)


@pytest.mark.skipif(not HAS_MLFLOW, reason="MLflow is not installed (pip install fcnseg[mlflow])")
def test_mlflow_run_holds_the_config_metrics_and_best_checkpoint(crashed_and_resumed, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir, _, first = crashed_and_resumed
    record = json.loads((run_dir / "mlflow.json").read_text())
    assert record == first  # the resumed run continued the crashed one's MLflow run
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.max_iters"] == "6"
    assert run.data.params["dataset.class_names"] == '["a", "b"]'
    columns, rows = read_csv(run_dir / "metrics.csv")
    assert set(run.data.metrics) == set(columns[1:])
    for tag in columns[1:]:  # every step once, with the CSV's value
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert history == [(int(r["iteration"]), float(r[tag])) for r in rows if r[tag]], tag
    stored = client.download_artifacts(run.info.run_id, "checkpoints/best.pt", str(tmp_path))
    assert Path(stored).read_bytes() == (run_dir / "checkpoints" / "best.pt").read_bytes()
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "val"}


def test_mlflow_missing_is_one_sentence(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] == "mlflow"] + ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(UserError, match=r"needs MLflow.*pip install 'fcnseg\[mlflow\]'"):
        MLflowLogger(tmp_path, tracking_uri=str(tmp_path / "mlruns"))


@pytest.mark.skipif(not HAS_MLFLOW, reason="MLflow is not installed (pip install fcnseg[mlflow])")
def test_an_mlflow_outage_mid_run_does_not_stop_training(tmp_path, monkeypatch):
    """The store stops answering after the first metrics and comes back later: training runs
    to the end, says so once, and the metrics logged meanwhile reach MLflow with their steps."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    calls, outage = [], range(2, 9)  # calls 2-8 fail (0 is the parameters)
    methods = {name: getattr(MlflowClient, name) for name in ("log_batch", "log_text")}

    def flaky(name):
        def call(self, *args, **kwargs):
            calls.append(name)
            if len(calls) - 1 in outage:
                raise MlflowException("API request failed: Connection refused")
            return methods[name](self, *args, **kwargs)

        return call

    log_artifact = MlflowClient.log_artifact

    def failing_log_artifact(self, run_id, path, *args, **kwargs):
        if path.endswith("best.pt"):
            raise MlflowException("API request failed: 413 Request Entity Too Large")
        return log_artifact(self, run_id, path, *args, **kwargs)

    for name in methods:
        monkeypatch.setattr(MlflowClient, name, flaky(name))
    monkeypatch.setattr(MlflowClient, "log_artifact", failing_log_artifact)
    run_dir = tmp_path / "run"
    mlflow = functools.partial(MLflowLogger, tracking_uri=str(tmp_path / "mlruns"), retry_after=0)
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        tiny_run(run_dir, [CSVLogger, mlflow])
    assert len(calls) > max(outage) + 1  # the outage ended before the run did
    assert (run_dir / "checkpoints" / "best.pt").is_file()  # trained to the end

    log = (run_dir / "train.log").read_text()
    assert log.count("MLflow could not") == 2  # one for the whole outage, one for best.pt
    assert log.count("MLflow answers again") == 1
    assert re.search(r"MLflow could not store \S+best\.pt \(it stays in the run directory\)", log)
    record = json.loads((run_dir / "mlflow.json").read_text())
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    columns, rows = read_csv(run_dir / "metrics.csv")
    assert set(run.data.metrics) == set(columns[1:])
    for tag in columns[1:]:  # every step once, with the CSV's value: none lost in the outage
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert history == [(int(r["iteration"]), float(r[tag])) for r in rows if r[tag]], tag


@pytest.mark.skipif(not HAS_MLFLOW, reason="MLflow is not installed (pip install fcnseg[mlflow])")
def test_an_mlflow_store_that_cannot_start_a_run_is_one_sentence(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(UserError, match=r"logger\.mlflow\.tracking_uri=file:.*taken: MLflow could"):
        MLflowLogger(tmp_path / "run", tracking_uri=str(tmp_path / "taken"))


def test_a_new_run_over_earlier_events_shows_only_its_own(tmp_path):
    """A start that failed before its first checkpoint (restarted by torchrun as a new run) or
    trainer.overwrite=true: TensorBoard shows the new run's curve alone, not both."""
    run_dir = tmp_path / "run"
    failed = TensorBoardLogger(run_dir)
    for step in range(1, 6):
        failed.log_scalars({"train/loss": 10.0 + step}, step)
    failed.close()
    new = TensorBoardLogger(run_dir)
    for step in range(1, 4):
        new.log_scalars({"train/loss": float(step)}, step)
    new.close()
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # kept


def test_evaluate_py_writes_the_tags_and_values_of_the_training_evaluations(tmp_path):
    """run_evaluation (evaluate.py eval.tensorboard=DIR) of the trained model at its last
    iteration writes what the trainer's TensorBoard logger wrote for the evaluation there: the
    same tags of every kind, the same values, table and picture."""
    trainer = tiny_run(tmp_path / "run", [TensorBoardLogger])
    val_set = SyntheticShapes(
        split="val", num_samples=2, min_size=32, max_size=40,
        transform=build_transforms(train=False),
    )  # fmt: skip
    run_evaluation(
        trainer.model, val_set, class_names=[f"c{i}" for i in range(NUM_CLASSES)],
        device="cpu", num_workers=0, tensorboard_dir=tmp_path / "eval", step=6, num_vis=1,
    )  # fmt: skip
    guidance = {"images": 0, "tensors": 0, "scalars": 0}
    trained = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance=guidance)
    evaluated = EventAccumulator(str(tmp_path / "eval"), size_guidance=guidance)
    trained.Reload(), evaluated.Reload()
    for kind in ("scalars", "images", "tensors"):
        evaluation_tags = {t for t in trained.Tags()[kind] if t.startswith("val/")}
        assert set(evaluated.Tags()[kind]) == evaluation_tags, kind
    scalars = set(evaluated.Tags()["scalars"])
    assert {"val/miou", "val/pixel_acc", "val/mean_acc", "val/fwiou"} < scalars
    assert scalars - {"val/miou", "val/pixel_acc", "val/mean_acc", "val/fwiou"} <= {
        f"val/iou/c{i}" for i in range(NUM_CLASSES)
    }
    assert set(evaluated.Tags()["images"]) == {
        "val/predictions", "val/confusion_matrix", "val/per_class_iou"
    }  # fmt: skip
    for tag in scalars:
        at_6 = [e.value for e in trained.Scalars(tag) if e.step == 6]
        assert [(e.step, e.value) for e in evaluated.Scalars(tag)] == [(6, at_6[0])], tag
    table = [
        [e.tensor_proto.string_val[0] for e in acc.Tensors("val/table/text_summary") if e.step == 6]
        for acc in (trained, evaluated)
    ]
    assert table[0] == table[1] and len(table[0]) == 1
    pictures = [
        [e.encoded_image_string for e in acc.Images("val/predictions") if e.step == 6]
        for acc in (trained, evaluated)
    ]
    assert pictures[0] == pictures[1] and len(pictures[0]) == 1
