"""The benchmarks: every measurement runs and reports its documented fields; the measuring
protocol, the step it times and the reference network are checked against independent
computations. No timing is asserted."""

from __future__ import annotations

import importlib.util
import inspect
import json
import mmap
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, ROOT, compose_config, run_script
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from PIL import Image
from torch import nn

from fcnseg.bench import common
from fcnseg.bench.convert import time_dense_scoring
from fcnseg.bench.data import time_data_pipeline
from fcnseg.bench.train import time_train_step
from fcnseg.bench.voc_layout import write_synthetic_voc
from fcnseg.data import VOCSegmentation
from fcnseg.engine.runtime import Runtime
from fcnseg.errors import UserError

TINY = ["bench.size=32", "bench.batch=1", "bench.iters=1", "bench.warmup=0", "trainer.device=cpu"]
TINY_SLIDE = [o for o in TINY if not o.startswith("bench.batch=")]  # one image: no batch key
ROW_KEYS = {
    "name",
    "iters",
    "images_per_s",
    "ms_per_iter",
    "peak_memory_mb",
    "memory",
    "flops_per_iter",
    "tflops",
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a loaded machine a second one mostly waits for a free core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _script():
    spec = importlib.util.spec_from_file_location(
        "benchmark_script", ROOT / "scripts" / "benchmark.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script_run():
    return _script().run


def _check_report(report: dict, mode: str, rows: int) -> None:
    assert report["mode"] == mode
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["cpu_cores"] >= 1 and env["device"] == "cpu"
    assert len(report["results"]) == rows
    for row in report["results"]:
        assert set(row) >= ROW_KEYS
        ms = row["ms_per_iter"]
        assert set(ms) == {"median", "p10", "p90", "min", "max"}
        assert 0 < ms["min"] <= ms["p10"] <= ms["median"] <= ms["p90"] <= ms["max"]
        assert row["images_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert row["memory"] in ("peak_rss", "peak_rss_since_start")
    json.dumps(report)  # JSON-ready as it is


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_network_modes_report_flops_and_time(mode):
    report = _script_run()(compose_config([f"bench={mode}", *TINY], "benchmark"))
    _check_report(report, mode, rows=1)
    row = report["results"][0]
    assert row["name"] == "fcnseg" and row["iters"] == 1
    assert row["flops_per_iter"] > 0 and row["tflops"] > 0
    assert report["settings"]["trainer"]["channels_last"] is False


def test_train_counts_forward_and_backward_flops():
    """Training FLOPs are forward + backward: between 2x and 3.2x the inference FLOPs."""
    run = _script_run()
    train = run(compose_config(["bench=train", *TINY], "benchmark"))["results"][0]
    infer = run(compose_config(["bench=infer", *TINY], "benchmark"))["results"][0]
    assert 2.0 <= train["flops_per_iter"] / infer["flops_per_iter"] <= 3.2


def test_slide_mode_counts_windows_and_compares_batching():
    overrides = [
        "bench=slide", "eval.mode=slide", "eval.crop_size=32", "eval.stride=24",
        "eval.batch_size=2", "bench.size=48", "bench.iters=1", "bench.warmup=0",
        "trainer.device=cpu",
    ]  # fmt: skip
    report = _script_run()(compose_config(overrides, "benchmark"))
    _check_report(report, "slide", rows=2)
    # 48 px, 32 px windows every 24 px: origins 0 and 16 on each axis (the last one flush).
    assert report["summary"]["windows_per_image"] == 4
    assert [r["name"] for r in report["results"]] == ["windows batched by 2", "windows one by one"]


def test_slide_mode_needs_slide_inference():
    with pytest.raises(UserError, match="eval.mode=slide"):
        _script_run()(compose_config(["bench=slide", *TINY_SLIDE], "benchmark"))


def test_metrics_mode_makes_one_bincount_per_batch_on_the_device():
    overrides = [
        "bench=metrics",
        "bench.size=16",
        "bench.batch=3",
        "bench.iters=1",
        "bench.warmup=0",
    ]
    report = _script_run()(compose_config([*overrides, "trainer.device=cpu"], "benchmark"))
    _check_report(report, "metrics", rows=2)
    summary = report["summary"]
    assert summary["bincount_calls_per_batch"] == 1
    assert summary["bincount_device"] == "cpu"
    assert summary["host_reads_per_batch"] <= 1


def test_data_mode_reads_a_voc_layout_folder_with_the_training_reader():
    overrides = [
        "bench=data",
        "bench.size=64",
        "bench.batch=2",
        "bench.iters=1",
        "trainer.num_workers=0",
    ]
    report = _script_run()(compose_config([*overrides, "bench.warmup=0"], "benchmark"))
    _check_report(report, "data", rows=1)
    assert report["settings"]["dataset"] == "VOCSegmentation"  # the reader training uses
    assert report["settings"]["first_image_size"] == [500, 375]
    summary = report["summary"]
    assert summary["images_per_s_per_core"] > 0
    assert {"decode", "check", "augment", "total"} == set(summary["median_ms_per_image"])
    assert {"pil", "opencv"} <= set(summary["jpeg_decode_ms"])


def test_voc_layout_round_trip(tmp_path):
    root = write_synthetic_voc(tmp_path, num_images=2, size=(50, 40), num_classes=21)
    base = root / "VOCdevkit" / "VOC2012"
    png = Image.open(base / "SegmentationClass" / "2007_000000.png")
    assert png.mode == "P" and png.size == (50, 40)
    raw = np.asarray(png)
    assert set(np.unique(raw)) <= set(range(21)) | {255}
    assert (raw == 255).any() and (raw == 0).any()  # object borders are ignored, as in VOC
    dataset = VOCSegmentation(root=root, split="train")
    image, mask = dataset.load(0)
    assert len(dataset) == 1 and image.shape == (40, 50, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(mask, raw)
    jpeg = np.asarray(Image.open(base / "JPEGImages" / "2007_000000.jpg").convert("RGB"))
    assert np.abs(image.astype(int) - jpeg.astype(int)).mean() < 2  # same file, other decoder
    assert (base / "ImageSets/Segmentation/val.txt").read_text() == "2007_000001\n"


def test_data_mode_with_loader_workers(tmp_path):
    root = write_synthetic_voc(tmp_path, num_images=4, size=(60, 45))
    from fcnseg.data.transforms import build_transforms

    tf = build_transforms(train=True, crop_size=32, scale_range=(0.5, 1.0))
    dataset = VOCSegmentation(root=root, split="train", transform=tf)
    report = time_data_pipeline(dataset=dataset, batch=2, num_workers=1, warmup=0, iters=1)
    _check_report(report, "data", rows=2)
    assert report["results"][1]["images_per_s_per_worker"] == report["results"][1]["images_per_s"]


class TinyVGG(nn.Module):
    """torchvision's VGG layout and forward (features, 7x7 adaptive pooling, three Linear
    layers), a few channels wide."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.vgg import make_layers

        self.features = make_layers([4, "M", 4, "M", 4, "M", 4, "M", 8, "M"])
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(8 * 7 * 7, 16), nn.ReLU(True), nn.Dropout(),
            nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(),
            nn.Linear(16, 7),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_convert_mode_times_one_pass_against_every_crop():
    report = time_dense_scoring(
        classifier=TinyVGG, size=288, crop=224, stride=32, device="cpu", warmup=0, iters=1
    )
    _check_report(report, "convert", rows=3)
    summary = report["summary"]
    assert summary["windows"] == 9 and summary["score_map"] == [3, 3]  # (288 - 224) / 32 + 1
    assert [r["name"] for r in report["results"]] == [
        "dense one pass",
        "9 crops batched",
        "9 crops one by one",
    ]
    flops = [r["flops_per_iter"] for r in report["results"]]
    assert flops[1] == flops[2] > flops[0]  # the same crops either way; one pass shares the work
    assert report["settings"]["conversion"] == "fcnseg.models.convert.fully_convolutional"


@pytest.mark.slow
def test_reference_fcn8s_is_fcnseg_vgg16_fcn8s():
    from fcnseg import build_model
    from fcnseg.models.reference import ReferenceFCN8s, reference_fcn8s_like

    torch.manual_seed(0)
    model = build_model(backbone="vgg16", head="fcn8s", num_classes=21).eval()
    with torch.no_grad():  # the score layers start at zero; make them say something
        for name, p in model.named_parameters():
            if "score" in name:
                p.normal_(std=0.01)
    reference = reference_fcn8s_like(model, 21).eval()
    assert sum(p.numel() for p in reference.parameters()) == 134_489_759  # the published count
    assert isinstance(reference, ReferenceFCN8s)
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    assert theirs.shape == (1, 21, 37, 53) and theirs.abs().max() > 0
    # Equal up to float rounding (fc6 is one matrix product on the CPU, the reference's a conv).
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_reference_refuses_another_network():
    from fcnseg import build_model
    from fcnseg.models.reference import reference_fcn8s_like

    with pytest.raises(UserError, match="backbone=vgg16 head=fcn8s"):
        reference_fcn8s_like(build_model(backbone="vgg_tiny", head="fcn8s", num_classes=5), 5)


@pytest.mark.parametrize(
    ("channels", "kwargs", "shape"),
    [
        ((16, 32, 7), {}, (2, 16, 12, 9)),  # fc6: a valid 7x7 window
        ((16, 32, 7), {"padding": 3}, (1, 16, 5, 4)),
        ((8, 4, 3), {"stride": 2, "dilation": 2}, (2, 8, 11, 13)),
    ],
)
def test_fully_connected_conv_is_a_conv(channels, kwargs, shape):
    from fcnseg.models.layers import FullyConnectedConv2d

    torch.manual_seed(0)
    conv, ours = nn.Conv2d(*channels, **kwargs), FullyConnectedConv2d(*channels, **kwargs)
    ours.load_state_dict(conv.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    expected, out = conv(x), ours(x)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(expected)
    for a, b in zip(
        torch.autograd.grad(expected, [x, conv.weight, conv.bias], grad),
        torch.autograd.grad(out, [x, ours.weight, ours.bias], grad),
    ):
        torch.testing.assert_close(b, a)
    nhwc = ours(x.detach().contiguous(memory_format=torch.channels_last))
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, expected.detach())


def test_fully_connected_conv_rejects_small_maps_as_conv_does():
    from fcnseg.models.layers import FullyConnectedConv2d

    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        FullyConnectedConv2d(4, 4, 7)(torch.randn(1, 4, 3, 3))


def test_time_calls_interleaves_and_warms_up():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    timed = common.time_calls(calls, device=torch.device("cpu"), warmup=2, iters=3)
    assert order == ["a", "b"] * 5
    assert [len(timed[k].seconds) for k in "ab"] == [3, 3]


def test_summarize_takes_throughput_from_the_median():
    row = common.summarize("x", common.Timed(seconds=[0.1, 0.4, 0.2, 0.3], peak_bytes=3 * 2**20),
                          images_per_call=4, flops=10**12)  # fmt: skip
    assert row["ms_per_iter"]["median"] == pytest.approx(250.0)
    assert row["ms_per_iter"]["min"] == pytest.approx(100.0) and row["ms_per_iter"][
        "max"
    ] == pytest.approx(400.0)
    assert row["ms_per_iter"]["p10"] == pytest.approx(130.0)  # numpy's linear interpolation
    assert row["images_per_s"] == pytest.approx(4 / 0.25)
    assert row["tflops"] == pytest.approx(1 / 0.25)
    assert row["peak_memory_mb"] == pytest.approx(3.0)


def test_count_flops_of_a_convolution():
    conv = nn.Conv2d(3, 5, 3)  # 8x8 -> 6x6: 5*6*6 outputs of 3*3*3 multiply-adds
    flops = common.count_flops(lambda: conv(torch.randn(2, 3, 8, 8)))
    assert flops == 2 * 2 * 5 * 6 * 6 * 3 * 3 * 3


def test_peak_memory_sees_an_allocation():
    memory = common.PeakMemory(torch.device("cpu"))
    memory.reset()
    before = memory.peak_bytes()
    # Fresh pages from the kernel (a heap could hand back memory already resident), all written.
    with mmap.mmap(-1, 64 * 2**20) as block:
        block.write(b"\x01" * (64 * 2**20))
        assert memory.peak_bytes() - before >= 60 * 2**20


def _cpuinfo(key: str) -> str:
    for entry in Path("/proc/cpuinfo").read_text().splitlines():
        if entry.split(":")[0].strip() == key:
            return entry.partition(":")[2].strip()
    raise AssertionError(f"/proc/cpuinfo has no {key}")


@pytest.mark.parametrize(
    ("name", "capability", "native_bf16", "said"),
    [
        ("Tesla V100-SXM2-16GB", (7, 0), False, "bf16 not native, fp16 on tensor cores"),
        ("Tesla T4", (7, 5), False, "bf16 not native, fp16 on tensor cores"),
        ("NVIDIA A100-SXM4-80GB", (8, 0), True, "bf16 native, fp16 on tensor cores"),
        ("Tesla P100-PCIE-16GB", (6, 0), False, "bf16 not native, fp16 without tensor cores"),
    ],
)
def test_a_gpu_table_names_the_gpu_and_its_half_precision(
    monkeypatch, name, capability, native_bf16, said
):
    props = type("Props", (), {"name": name, "total_memory": 16 * 2**30})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: native_bf16 or including_emulation,
    )
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    env = common.environment("cuda:0")
    assert env["bf16_native"] is native_bf16
    report = {"mode": "train", "settings": {}, "environment": env, "results": [], "summary": {}}
    table = common.format_table(report)
    auto = "bf16" if native_bf16 else "fp16"
    assert table.splitlines()[0] == (
        f"measured on {name} (compute capability {capability[0]}.{capability[1]}); {said}; "
        f"trainer.amp=auto: {auto}"
    )
    assert table.splitlines()[1:3] == ["", "| variant | images/s | ms/iter median (p10-p90) "
                                       "| peak memory (MB) | TFLOP/s |"]  # fmt: skip


def test_cli_writes_json_and_only_json(tmp_path):
    out = tmp_path / "metrics.json"
    args = [
        "bench=metrics",
        "bench.size=16",
        "bench.batch=1",
        "bench.iters=1",
        "bench.warmup=0",
    ]
    done = run_script(
        "benchmark.py", *args, "bench.threads=1", "trainer.device=cpu", f"out={out}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "| SegMetrics.update" in done.stdout
    # The table says what it was measured on: this CPU and its half-precision instructions.
    flags = _cpuinfo("flags").split()
    half = [f for f in ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16") if f in flags]
    line = next(x for x in done.stdout.splitlines() if x.startswith("measured on "))
    assert line.startswith(f"measured on {_cpuinfo('model name')} (")
    assert f"half-precision flags: {', '.join(half) or 'none'};" in line
    bf16 = "yes" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"
    assert f"oneDNN native bf16 {bf16}," in line
    auto = "bf16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "none"
    assert line.endswith(f"; trainer.amp=auto: {auto}")
    report = json.loads(out.read_text())
    assert report["command"].startswith("python scripts/benchmark.py bench=metrics")
    assert {"mode", "settings", "environment", "results", "summary"} <= set(report)
    assert report["environment"]["torch_threads"] == 1
    assert list(tmp_path.iterdir()) == [out]  # nothing else written (no Hydra run folder)


def test_unknown_mode_is_named_with_the_choices():
    with pytest.raises(MissingConfigException) as err:
        compose_config(["bench=fast"], "benchmark")
    choices = "".join(f"\t{mode}\n" for mode in sorted(BENCHES))
    assert "Could not find 'bench/fast'" in str(err.value)
    assert f"Available options in 'bench':\n{choices}" in str(err.value)


BENCHES = sorted(p.stem for p in (CONFIGS / "bench").glob("*.yaml"))


@pytest.mark.parametrize("name", BENCHES)
def test_every_bench_config_names_a_measurement_and_its_settings(name):
    """``bench=NAME`` is a function of ``fcnseg.bench.NAME``; every key of the config is one
    of its parameters, and the script's pieces complete the rest."""
    cfg = compose_config([f"bench={name}", "trainer.device=cpu"], "benchmark")
    measure = instantiate(cfg.bench)
    assert isinstance(measure, partial) and measure.func.__module__ == f"fcnseg.bench.{name}"
    signature = inspect.signature(measure.func)
    assert set(measure.keywords) <= set(signature.parameters)
    assert {"warmup", "iters", "threads"} <= set(measure.keywords)
    built = []
    pieces = {key: partial(built.append, key) for key in _script().pieces(cfg)}
    common.complete(measure, pieces)
    wanted = {k for k in signature.parameters if k not in measure.keywords}
    assert set(built) == wanted & set(pieces)  # only what the measurement asks for is built


def test_complete_builds_only_the_missing_pieces_asked_for():
    def measure(*, model, size, runtime=None, threads=None):
        return {"model": model, "size": size, "runtime": runtime}

    def never():
        raise AssertionError("built a piece nobody asked for")

    pieces = {"model": lambda: "net", "runtime": lambda: "cpu", "optimizer": never}
    done = common.complete(partial(measure, size=3), pieces)()
    assert done == {"model": "net", "size": 3, "runtime": "cpu"}
    with pytest.raises(UserError, match="measure needs size"):
        common.complete(measure, pieces)


def test_train_mode_times_the_training_step(tmp_path):
    """Every warm-up and timed call is one optimizer step of ``TrainStep``: the schedule moves
    once per call, the weights change, the loss is the training loss; no files are written."""
    from fcnseg import build_model

    torch.manual_seed(0)
    model = build_model(backbone="vgg_tiny", head="fcn8s", num_classes=3)
    before = [p.detach().clone() for p in model.parameters()]
    schedules = []

    def scheduler(opt):
        schedules.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0))
        return schedules[-1]

    report = time_train_step(
        model=model, optimizer=partial(torch.optim.SGD, lr=0.1), scheduler=scheduler,
        runtime=Runtime.setup("cpu", distributed=False), num_classes=3, size=32, batch=2,
        warmup=2, iters=3,
    )  # fmt: skip
    _check_report(report, "train", rows=1)
    assert [s.last_epoch for s in schedules] == [2 + 3]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert report["settings"]["trainer"] == {
        "device": "cpu", "amp": "none", "channels_last": False, "compile": False, "accumulate": 1,
    }  # fmt: skip


def test_deploy_mode_times_each_eager_layout_with_the_same_labels():
    """channels_last is the same network in another memory layout: its labels equal NCHW's."""
    report = _script_run()(
        compose_config(
            [
                "bench=deploy", "trainer.device=cpu", "bench.height=40", "bench.width=48",
                "bench.iters=1", "bench.warmup=0", "bench.threads=[1]",
                "bench.variants=[eager_fp32,eager_fp32_channels_last]",
            ],
            "benchmark",
        )
    )  # fmt: skip
    _check_report(report, "deploy", rows=2)
    assert [row["variant"] for row in report["results"]] == [
        "eager_fp32", "eager_fp32_channels_last"
    ]  # fmt: skip
    assert report["results"][1]["label_agreement"] == 1.0
    assert report["summary"]["eager_fp32_channels_last_1t_vs_eager_fp32_speed"] > 0
