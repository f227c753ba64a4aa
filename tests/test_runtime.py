"""Runtime: the device each process takes under any launcher, precision that fits the hardware,
and fp16 updates skipped by the gradient scaler counted."""

from __future__ import annotations

import logging

import pytest
import torch
from test_resume import NUM_CLASSES, one_thread, tiny_trainer  # noqa: F401 - fixture

from fcnseg.engine import runtime
from fcnseg.engine.record import RunRecord
from fcnseg.engine.summary import run_summary
from fcnseg.errors import UserError
from fcnseg.utils.distributed import resolve_device


@pytest.fixture
def gpus(monkeypatch):
    """Pretends this machine shows ``n`` GPUs (no CUDA call is made)."""

    def show(n: int, *, bf16: bool = True, name: str = "Tesla V100-SXM2-16GB") -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return show


def test_each_process_takes_its_gpu_or_the_one_it_was_given(gpus):
    gpus(4)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("auto", local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="LOCAL_RANK=4 has no GPU of its own: this machine shows 4"):
        resolve_device("cuda", local_rank=4)
    with pytest.raises(
        UserError, match=r"trainer.device=cuda:7 names no GPU .* \(cuda:0 to cuda:3\)"
    ):
        resolve_device("cuda:7")
    # srun --gpus-per-task=1, a per-rank CUDA_VISIBLE_DEVICES: every process sees one GPU.
    gpus(1)
    assert resolve_device("cuda", local_rank=5) == torch.device("cuda", 0)
    gpus(0)
    with pytest.raises(UserError, match="trainer.device=cuda:0 but no CUDA device is visible"):
        resolve_device("cuda:0")
    with pytest.raises(UserError, match="is not one of auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")


@pytest.fixture
def logged():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("fcnseg")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize(
    ("device", "native_bf16", "auto"),
    [
        ("cuda", True, "bf16"),
        ("cuda", False, "fp16"),
        ("cpu", True, "bf16"),
        ("cpu", False, "none"),
    ],
)
def test_auto_picks_the_hardwares_precision(gpus, monkeypatch, logged, device, native_bf16, auto):
    gpus(1, bf16=native_bf16, name="Tesla T4")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native_bf16)
    dev = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    chosen, note = runtime.choose_precision("auto", dev)
    assert chosen == auto and note.startswith("picked by trainer.amp=auto: ")
    why = note.removeprefix("picked by trainer.amp=auto: ")
    assert logged[-1].getMessage() == f"trainer.amp=auto picks {auto}: {why}"
    assert ("has native bfloat16" in why or "has bf16 instructions" in why) == (auto == "bf16")
    # What auto picks, asked for explicitly, runs without a word; so does fp32.
    before = len(logged)
    assert runtime.choose_precision(auto, dev) == (auto, "")
    assert runtime.choose_precision("none", dev) == ("none", "")
    assert len(logged) == before


@pytest.mark.parametrize(
    ("device", "native_bf16", "asked", "said"),
    [
        ("cuda", False, "bf16", "Tesla T4 has no native bfloat16"),
        ("cpu", True, "fp16", "CPUs compute float16 many times slower than float32"),
        ("cpu", False, "bf16", "this CPU has no bf16 instructions"),
    ],
)
def test_a_precision_the_hardware_runs_badly_runs_with_a_warning(
    gpus, monkeypatch, logged, device, native_bf16, asked, said
):
    gpus(1, bf16=native_bf16, name="Tesla T4")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native_bf16)
    dev = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    chosen, note = runtime.choose_precision(asked, dev)
    assert chosen == asked
    record = logged[-1]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"trainer.amp={asked} {note}"
    assert said in note and "trainer.amp=auto would pick" in note


def test_updates_skipped_by_the_fp16_scaler_are_counted(tmp_path):
    """A gradient scale far beyond fp16's range makes every scaled gradient overflow: the scaler
    skips the update and halves the scale, and the trainer counts each skip."""
    trainer = tiny_trainer(tmp_path, amp="fp16", max_iters=10)  # the poly lr is not 0 at step 4
    scaler = trainer.step.scaler
    scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**100})
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    images, targets = torch.randn(2, 3, 32, 32), torch.randint(0, NUM_CLASSES, (2, 32, 32))
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    trainer.log.addHandler(handler)  # the trainer set the logger up anew
    try:
        losses = [trainer.run_step(images, targets) for _ in range(4)]
    finally:
        trainer.log.removeHandler(handler)
    assert all(torch.isfinite(torch.tensor(losses)))  # the loss itself was fine
    assert scaler.get_scale() == 2.0**96  # halved once per skipped step
    assert trainer.skips.count == 4
    # Rate-limited: the 1st, 2nd and 4th skip are said, and that most updates were skipped.
    assert [m.split(":")[0] for m in said] == [
        "iteration 1", "iteration 2", "4 of the last 4 updates were skipped", "iteration 4"
    ]  # fmt: skip
    assert f"lowered its scale to {2.0**96:g}; 4 update(s) skipped so far" in said[3]
    assert said[2].startswith("4 of the last 4 updates were skipped: the model is barely training")
    assert f"the fp16 gradient scale is down to {2.0**96:g}" in said[2]
    for before, after in zip(weights, trainer.model.parameters()):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    # A scale in range: the next step updates, and nothing more is counted.
    scaler.load_state_dict({**scaler.state_dict(), "scale": 1024.0})
    trainer.run_step(images, targets)
    assert trainer.skips.count == 4
    assert any(not torch.equal(b, a) for b, a in zip(weights, trainer.model.parameters()))


def test_the_evaluation_inside_training_feeds_the_models_memory_layout(tmp_path):
    trainer = tiny_trainer(tmp_path, channels_last=True)
    layouts = []
    trainer.model.register_forward_pre_hook(
        lambda module, args: layouts.append(
            args[0].is_contiguous(memory_format=torch.channels_last)
        )
    )
    metrics = trainer.validate()
    assert metrics is not None and layouts and all(layouts)


def test_the_start_up_block_says_what_auto_picked_and_why(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    trainer = tiny_trainer(tmp_path, amp="auto")
    assert trainer.runtime.amp == "none"
    lines = run_summary(
        record=RunRecord(class_names=["a"]), settings=trainer.settings, runtime=trainer.runtime,
        sizes={"train": 8}, optimizer=trainer.optimizer, scheduler=trainer.scheduler, start=0,
        run_dir=tmp_path,
    )  # fmt: skip
    assert lines[3].startswith(
        "runtime: cpu x 1 process(es), amp none (picked by trainer.amp=auto: this CPU has no "
        "bf16 instructions (AVX512-BF16, AMX)), channels_last False"
    )
