"""The one CPU probe (fcnseg.utils.cpu), from hand-written /proc/cpuinfo texts, and its three
readers: trainer.amp=auto's bf16 test, the benchmarks' environment and the deployment flags."""

from __future__ import annotations

import pytest

from fcnseg.utils import cpu

# Two logical CPUs of an x86 machine, as Linux writes them (tabs before the colons).
X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 avx512_fp16

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Some Other Name
flags\t\t: fpu sse2
"""
# An ARM kernel's: "Features", and no model name.
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 bf16
CPU implementer\t: 0x41
"""
# An AMD EPYC without AVX-512.
EPYC = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_the_first_cpus_model_name_and_flags_are_read():
    info = cpu.parse_cpuinfo(X86)
    assert info.model_name == "Intel(R) Xeon(R) Platinum 8480+"
    assert info.flags == {
        "fpu", "sse2", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
        "avx512_fp16",
    }  # fmt: skip


def test_arm_features_are_flags_and_a_missing_model_name_is_none():
    info = cpu.parse_cpuinfo(ARM)
    assert info.model_name is None
    assert info.flags == {"fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "bf16"}


def test_a_text_without_flags_has_none_of_them():
    assert cpu.parse_cpuinfo("processor\t: 0\nmodel name\t: X\n") == cpu.CpuInfo("X", frozenset())


def test_an_unreadable_file_is_none_for_both(tmp_path):
    assert cpu.read_cpu_info(tmp_path / "missing") == cpu.CpuInfo(None, None)
    assert cpu.read_cpu_info(tmp_path) == cpu.CpuInfo(None, None)  # a folder


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch, request):
    """Makes the probe read the text given to the returned function instead of this machine's."""

    def use(text: str | None) -> None:
        path = tmp_path / "cpuinfo"
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
        monkeypatch.setattr(cpu, "CPUINFO", path)
        cpu.cpu_info.cache_clear()

    request.addfinalizer(cpu.cpu_info.cache_clear)  # runs before monkeypatch puts CPUINFO back
    return use


def test_the_probe_reads_once_per_process(cpuinfo, tmp_path):
    cpuinfo(EPYC)
    assert cpu.cpu_model_name() == "AMD EPYC 7B12"
    assert cpu.cpu_flags() == {"fpu", "sse2", "avx", "avx2", "fma"}
    (tmp_path / "cpuinfo").write_text(X86)
    assert cpu.cpu_model_name() == "AMD EPYC 7B12"  # cached: the CPU does not change
    cpu.cpu_info.cache_clear()
    assert cpu.cpu_model_name() == "Intel(R) Xeon(R) Platinum 8480+"


@pytest.mark.parametrize(("text", "bf16"), [(X86, True), (EPYC, False), (ARM, False), (None, True)])
def test_amp_auto_asks_the_probe_for_bf16_instructions(cpuinfo, text, bf16):
    """x86's avx512_bf16/amx_bf16 count; an unreadable file assumes them (runtime's choice)."""
    from fcnseg.engine import runtime

    cpuinfo(text)
    assert runtime.cpu_has_bf16() is bf16


def test_the_benchmarks_report_the_probes_cpu(cpuinfo):
    import torch

    from fcnseg.bench import common, deploy

    cpuinfo(X86)
    env = common.environment("cpu")
    assert env["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert env["cpu_half_flags"] == ["avx512_bf16", "amx_bf16", "avx512_fp16"]
    assert deploy._cpu_flags() == [
        "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
    ]  # fmt: skip
    cpuinfo(None)
    env = common.environment(torch.device("cpu"))
    assert env["cpu"]  # the platform's name instead
    assert env["cpu_half_flags"] is None
    assert deploy._cpu_flags() == []
