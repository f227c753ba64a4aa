"""train.log holds every line a training run logs, from its first, and nothing of a refused run.

A run logs before its run directory is accepted (its median-frequency class weights, computed
from the training labels) and may write nothing there until then: those lines are printed at
once and reach train.log when the directory is accepted.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN, compose_config, run_script
from hydra.utils import instantiate
from test_class_weights import independent_weights

from fcnseg.utils.logging import LOGGER_NAME, get_logger, launched_as_main, setup_logging

#: the start of a line of fcnseg's logger, on the console and in train.log alike.
RECORD = re.compile(r"\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
WEIGHTS = ["loss.class_weights=median_frequency"]


@pytest.fixture(scope="module")
def weighted_run(tmp_path_factory):
    """A finished run with median-frequency class weights, counted afresh; its directory, the
    process, and the cache folder."""
    tmp = tmp_path_factory.mktemp("weighted")
    run_dir, cache = tmp / "run", tmp / "cache"
    proc = run_script(
        "train.py", *TINY_RUN, *WEIGHTS, f"hydra.run.dir={run_dir}",
        env={"FCNSEG_CACHE": str(cache)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc, cache


def test_train_log_holds_every_line_the_run_logged_from_its_first(weighted_run):
    run_dir, proc, _ = weighted_run
    log = (run_dir / "train.log").read_text().splitlines()
    printed = proc.stderr.splitlines()
    # The same records, in the same order, as printed; lines that continue a record included.
    assert [line for line in printed if RECORD.match(line)] == [
        line for line in log if RECORD.match(line)
    ]
    rest = iter(printed)
    assert all(line in rest for line in log), "train.log holds a line that was not printed"
    # The class weights come first, before the run directory was accepted, and are the
    # weights of the training labels counted here.
    first = re.fullmatch(
        r".* INFO median-frequency class weights \(cached in .*\): \[(.*)\]", log[0]
    )
    assert first, log[0]
    cfg = compose_config(TINY_RUN)
    train_set = instantiate(cfg.dataset.builder)(split="train")
    masks = [train_set.load(i)[1] for i in range(len(train_set))]
    expected = independent_weights(masks, cfg.dataset.num_classes)
    np.testing.assert_allclose([float(w) for w in first[1].split(", ")], expected, atol=5e-5)
    accepted = log.index(next(line for line in log if line.endswith(f"run directory: {run_dir}")))
    assert accepted > 0
    for text in (proc.stdout, proc.stderr, "\n".join(log)):
        assert "[HYDRA]" not in text


def test_a_refused_run_leaves_the_log_it_found_byte_for_byte(weighted_run):
    run_dir, _, cache = weighted_run

    def checksums() -> dict[str, str]:
        return {
            str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*"))
            if p.is_file()
        }

    before = checksums()
    assert "train.log" in before
    proc = run_script(
        "train.py", *TINY_RUN, *WEIGHTS, f"hydra.run.dir={run_dir}",
        env={"FCNSEG_CACHE": str(cache)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "already holds a run" in errors[0], proc.stderr[-3000:]
    # It logged its class weights (read from the cache) before it was refused: printed only.
    assert any(
        "INFO median-frequency class weights from" in line for line in proc.stderr.split("\n")
    )
    assert checksums() == before


# In-process: the logger's hold, as train.py and the trainer use it.


@pytest.fixture
def fcnseg_logger():
    """The fcnseg logger, put back as it was after the test."""
    logger = logging.getLogger(LOGGER_NAME)
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    logger.handlers = []
    yield logger
    for handler in logger.handlers:
        handler.close()
    logger.handlers, logger.propagate = handlers, propagate
    logger.setLevel(level)


def _messages(path: Path) -> list[str]:
    """The file's lines without their times."""
    return [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in path.read_text().splitlines()]


def test_held_lines_reach_the_file_first_as_they_read_when_logged(fcnseg_logger, tmp_path, capsys):
    log_file = tmp_path / "run" / "train.log"
    setup_logging(hold=True)
    weights = [1.0, 2.0]
    get_logger().info("class weights %s", weights)
    weights.append(3.0)  # after the line was logged: the file shows what was printed
    get_logger().warning("a warning")
    try:
        raise ValueError("the cause")
    except ValueError:
        get_logger().exception("a failure")
    assert not log_file.parent.exists()  # nothing written before the file is named
    setup_logging(log_file)
    get_logger().info("after")
    lines = _messages(log_file)
    assert lines[:3] == ["INFO class weights [1.0, 2.0]", "WARNING a warning", "ERROR a failure"]
    assert lines[3] == "Traceback (most recent call last):"
    assert lines[-2:] == ["ValueError: the cause", "INFO after"]
    assert log_file.read_text() == capsys.readouterr().err  # printed the same, once each


def test_other_processes_write_no_file_and_keep_nothing(fcnseg_logger, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert not launched_as_main()
    setup_logging(main_process=launched_as_main(), hold=True)
    get_logger().warning("held on rank 1")
    setup_logging(tmp_path / "train.log", main_process=False)
    get_logger().warning("later on rank 1")
    assert not (tmp_path / "train.log").exists()
    monkeypatch.delenv("RANK")
    assert launched_as_main()  # alone, without a launcher


def test_a_new_hold_starts_empty(fcnseg_logger, tmp_path):
    # The jobs of a multirun run one after the other in one process.
    setup_logging(hold=True)
    get_logger().info("job 0, refused")
    setup_logging(hold=True)
    get_logger().info("job 1")
    setup_logging(tmp_path / "train.log")
    assert _messages(tmp_path / "train.log") == ["INFO job 1"]


def test_fcnseg_lines_never_reach_the_root_logger(fcnseg_logger, capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[HYDRA] %(message)s"))
    root.addHandler(handler)
    try:
        setup_logging(hold=True)
        get_logger().info("weights")
    finally:
        root.removeHandler(handler)
    out = capsys.readouterr()
    assert out.out == "" and RECORD.match(out.err) and out.err.endswith(" INFO weights\n")
