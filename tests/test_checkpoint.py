"""Checkpoints: atomic writes that survive SIGKILL, weights-only reads that refuse code."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import signal
import time

import numpy as np
import pytest
import torch

from fcnseg.errors import UserError
from fcnseg.utils.atomic import temporary_pattern
from fcnseg.utils.checkpoint import (
    load_checkpoint,
    load_weights_only,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_round_trip_keeps_values_and_gives_the_usual_file_mode(tmp_path):
    state = {
        "model": {"w": torch.arange(6.0).view(2, 3)},
        "iteration": 7,
        "config": {"a": [1, "x"]},
    }
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["iteration"] == 7 and loaded["config"] == {"a": [1, "x"]}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_a_failed_save_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "iteration": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        save_checkpoint({"model": {}, "iteration": 2, "bad": lambda: None}, path)
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_stale_temporaries_of_a_killed_save_are_removed_by_the_next(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    save_checkpoint({"model": {}}, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


class _CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: the file appears if anything runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_checkpoint_holding_code_is_refused_and_nothing_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": {"w": torch.zeros(2)}, "extra": _CreatesFile(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UserError, match="evil.pt") as err:
        load_checkpoint(path)
    assert not marker.exists()
    if writer == "torch.save":
        assert "refused unread" in str(err.value)
    # The payload is real: an unsafe load does create the file.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_damaged_files_are_named_in_one_sentence(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.ones(1000)}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, garbage):
        with pytest.raises(UserError, match=f"checkpoint {path} is not a readable") as err:
            load_checkpoint(path)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(UserError, match=f"checkpoint {tmp_path} is a directory, not a checkpoint"):
        load_checkpoint(tmp_path)
    no_model = tmp_path / "no_model.pt"
    save_checkpoint({"weights": {}}, no_model)
    with pytest.raises(UserError, match="no 'model' entry"):
        load_checkpoint(no_model)


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    def draws():
        return (
            torch.rand(3).tolist(),
            np.random.rand(3).tolist(),
            [random.random() for _ in range(3)],
        )

    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    draws()  # move away from the seeded start
    save_checkpoint({"model": {}, "rng": rng_state()}, tmp_path / "rng.pt")
    expected = draws()
    draws()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draws() == expected


def _save_forever(path: str) -> None:
    torch.set_num_threads(1)
    i = 0
    while True:
        i += 1
        # Every value of the big tensor encodes the iteration: a torn file cannot pass for whole.
        save_checkpoint({"model": {"w": torch.full((1_000_000,), float(i))}, "iteration": i}, path)


@pytest.mark.slow
def test_sigkill_during_repeated_saves_always_leaves_a_loadable_last_pt(tmp_path):
    path = tmp_path / "last.pt"
    context = multiprocessing.get_context("fork")  # a fork starts in milliseconds
    rnd = random.Random(0)
    seen, killed_mid_save = 0, 0
    for _ in range(8):
        child = context.Process(target=_save_forever, args=(str(path),), daemon=True)
        child.start()
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rnd.uniform(0.05, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        killed_mid_save += any(tmp_path.glob(temporary_pattern(path)))
        ckpt = load_checkpoint(path)
        assert torch.all(ckpt["model"]["w"] == ckpt["iteration"])
        assert ckpt["iteration"] >= 1
        seen += 1
    assert seen == 8
    # The loop spends nearly all its time inside save_checkpoint: most kills tear a write.
    assert killed_mid_save >= 1


@pytest.mark.parametrize(
    "content,kind",
    [
        (b"101 lines of notes\n", "it is a text file, not one that torch.save writes"),
        ("état\n".encode(), "it is a text file"),
        (b"", "it is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "neither a zip archive nor a pickle"),
    ],
)
def test_a_file_that_torch_save_did_not_write_says_so(tmp_path, content, kind):
    """A text file once failed as "KeyError: '101'" (the unknown pickle opcode of its "1")."""
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_weights_only(path, what=f"backbone.weights={path}")
    message = str(err.value)
    assert message.startswith(f"backbone.weights={path} is not a readable PyTorch checkpoint file")
    assert kind in message and "'101'" not in message and "\n" not in message


def test_load_weights_only_reads_what_torch_save_writes(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(3)}, path)
    assert torch.equal(load_weights_only(path, what="weights")["w"], torch.arange(3))
    legacy = tmp_path / "legacy.pt"  # the pre-1.6 format: a pickle, not a zip archive
    torch.save({"w": torch.arange(3)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_weights_only(legacy, what="weights")["w"], torch.arange(3))
