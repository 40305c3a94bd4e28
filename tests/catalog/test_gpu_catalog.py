"""The GPU catalog: coverage, sane values, look-ups by typed names and by driver-reported names."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vramancer.devices.catalog import GPUS, GpuSpec, find_gpu, list_gpus, match_device_name, normalize_gpu_name

GiB = 2**30
MiB = 2**20

REQUIRED = [
    "gtx1060-6gb", "gtx1070", "gtx1080", "gtx1080ti",
    "rtx2060", "rtx2070", "rtx2080", "rtx2080ti", "titan-rtx",
    "rtx3060-12gb", "rtx3060-8gb", "rtx3060ti", "rtx3070", "rtx3080-10gb", "rtx3080-12gb", "rtx3080ti",
    "rtx3090", "rtx3090ti",
    "rtx4060", "rtx4060ti-8gb", "rtx4060ti-16gb", "rtx4070", "rtx4070-super", "rtx4070ti", "rtx4070ti-super",
    "rtx4080", "rtx4080-super", "rtx4090",
    "rtx5060ti-16gb", "rtx5070", "rtx5070ti", "rtx5080", "rtx5090",
    "rx6700xt", "rx6800", "rx6800xt", "rx6900xt", "rx7600", "rx7800xt", "rx7900xt", "rx7900xtx",
    "rtx-a4000", "rtx-a5000", "rtx-a6000", "rtx6000-ada",
    "t4", "v100-16gb", "v100-32gb", "a10", "a100-40gb", "a100-80gb", "h100-pcie", "h100", "h200", "l4", "l40s",
    "m1-16gb", "m2-pro-32gb", "m3-max-64gb", "m4-max-64gb", "m4-pro-24gb",
]


def test_catalog_covers_the_required_gpus():
    assert len(GPUS) >= 45
    missing = [k for k in REQUIRED if k not in GPUS]
    assert not missing
    assert list_gpus() == list(GPUS.values())


@pytest.mark.parametrize("spec", list_gpus(), ids=lambda s: s.key)
def test_every_spec_is_sane(spec: GpuSpec):
    assert isinstance(spec.memory_bytes, int) and spec.memory_bytes >= 6 * GiB
    assert spec.vendor in ("nvidia", "amd", "apple", "intel")
    assert spec.tflops > 0
    assert spec.link_bandwidth_bytes_per_s > 0
    assert spec.arch
    assert spec.unified_memory == (spec.vendor == "apple")
    if spec.unified_memory:
        assert spec.bandwidth_bytes_per_s > 50e9
        assert spec.link_bandwidth_bytes_per_s == spec.bandwidth_bytes_per_s
    else:
        assert spec.bandwidth_bytes_per_s > 150e9
        assert spec.link_bandwidth_bytes_per_s in (15.75e9, 31.5e9, 63e9)
    # typo guards (sparse figures, TB/s written as GB/s): dense FP16 is at most ~1 PFLOPS in this
    # catalog (H100/H200 SXM: 989.4) and the most compute-heavy card (L4) does ~400 FLOP per byte read
    assert spec.tflops <= 1000
    assert spec.tflops * 1e12 / spec.bandwidth_bytes_per_s < 500


def test_keys_aliases_and_names_are_unique_after_normalisation():
    seen: dict[str, str] = {}
    for spec in list_gpus():
        for text in {normalize_gpu_name(t) for t in (spec.key, spec.name, *spec.aliases)}:
            assert text not in seen, f"{text!r} names both {seen[text]} and {spec.key}"
            seen[text] = spec.key


@pytest.mark.parametrize("spec", list_gpus(), ids=lambda s: s.key)
def test_every_spec_is_found_by_key_name_and_aliases(spec: GpuSpec):
    for text in (spec.key, spec.name, spec.key.upper(), *spec.aliases):
        assert find_gpu(text) is spec, text
    assert match_device_name(spec.name, spec.memory_bytes) is spec


def test_published_values_of_well_known_cards():
    g = GPUS["rtx3090"]
    assert (g.memory_bytes, g.bandwidth_bytes_per_s, g.tflops) == (24 * GiB, 936e9, 71.0)
    assert g.name == "NVIDIA GeForce RTX 3090" and g.arch == "ampere" and g.link_bandwidth_bytes_per_s == 31.5e9
    g = GPUS["rtx4090"]
    assert (g.memory_bytes, g.bandwidth_bytes_per_s, g.tflops) == (24 * GiB, 1008e9, 165.2)
    g = GPUS["h100"]
    assert (g.memory_bytes, g.bandwidth_bytes_per_s, g.tflops, g.link_bandwidth_bytes_per_s) == (
        80 * GiB, 3.35e12, 989.4, 63e9)
    assert GPUS["a100-80gb"].bandwidth_bytes_per_s == 2039e9 and GPUS["a100-40gb"].memory_bytes == 40 * GiB
    assert GPUS["rtx4060"].link_bandwidth_bytes_per_s == 15.75e9          # PCIe 4.0 x8
    assert GPUS["rtx5060ti-16gb"].link_bandwidth_bytes_per_s == 31.5e9   # PCIe 5.0 x8
    assert GPUS["gtx1080ti"].tflops == 11.34                            # Pascal: the FP32 rate
    assert GPUS["m3-max-64gb"].memory_bytes == 64 * GiB and GPUS["m3-max-64gb"].unified_memory


@pytest.mark.parametrize("text", ["RTX 3090", "geforce-rtx-3090", "rtx3090", "NVIDIA GeForce RTX 3090",
                                  "nvidia geforce rtx 3090", "GeForce RTX(TM) 3090", "3090"])
def test_find_gpu_normalises_names(text):
    assert find_gpu(text).key == "rtx3090"


@pytest.mark.parametrize("text,key", [
    ("rtx3060", "rtx3060-12gb"), ("RTX 3060 8GB", "rtx3060-8gb"), ("rtx3060-12gb", "rtx3060-12gb"),
    ("rtx 3060 ti", "rtx3060ti"), ("rtx3080", "rtx3080-10gb"), ("a100", "a100-80gb"),
    ("A100 40GB", "a100-40gb"), ("h100", "h100"), ("H100 PCIe", "h100-pcie"), ("h200", "h200"),
    ("RX 7900 XTX", "rx7900xtx"), ("AMD Radeon RX 6800 XT", "rx6800xt"), ("7900xtx", "rx7900xtx"),
    ("rtx 4070 ti super", "rtx4070ti-super"), ("RTX 4070 SUPER", "rtx4070-super"), ("Tesla T4", "t4"),
    ("RTX 6000 Ada", "rtx6000-ada"), ("m3-max", "m3-max-64gb"), ("Apple M4 Max 128GB", "m4-max-128gb"),
    ("titan rtx", "titan-rtx"), ("rtx a6000", "rtx-a6000"), ("v100", "v100-16gb"), ("l40s", "l40s"),
])
def test_find_gpu_aliases_and_variants(text, key):
    assert find_gpu(text).key == key


@pytest.mark.parametrize("text", ["", "   ", "rtx9999", "Quadro RTX 6000", "NVIDIA GeForce RTX 3050", "cpu",
                                  "AMD Radeon Graphics", "nvidia"])
def test_unknown_gpus_are_none(text):
    assert find_gpu(text) is None
    assert match_device_name(text) is None


@pytest.mark.parametrize("name,memory,key", [
    # names as NVML / ROCm report them, with the total memory the driver reports
    ("NVIDIA GeForce RTX 3060", 12288 * MiB, "rtx3060-12gb"),
    ("NVIDIA GeForce RTX 3060", 8192 * MiB, "rtx3060-8gb"),
    ("NVIDIA GeForce RTX 3060", None, "rtx3060-12gb"),
    ("NVIDIA GeForce RTX 3060 Ti", 8192 * MiB, "rtx3060ti"),
    ("NVIDIA GeForce RTX 3080", 10240 * MiB, "rtx3080-10gb"),
    ("NVIDIA GeForce RTX 3080", 12288 * MiB, "rtx3080-12gb"),
    ("NVIDIA GeForce RTX 4060 Ti", 16380 * MiB, "rtx4060ti-16gb"),
    ("NVIDIA GeForce RTX 4060 Ti", 8188 * MiB, "rtx4060ti-8gb"),
    ("NVIDIA GeForce GTX 1060 6GB", 6144 * MiB, "gtx1060-6gb"),
    ("GeForce GTX 1080 Ti", 11264 * MiB, "gtx1080ti"),
    ("NVIDIA H100 80GB HBM3", 81559 * MiB, "h100"),
    ("NVIDIA H100 PCIe", 81559 * MiB, "h100-pcie"),
    ("NVIDIA H200", 143771 * MiB, "h200"),
    ("NVIDIA A100-SXM4-40GB", 40960 * MiB, "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", 81920 * MiB, "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", None, "a100-80gb"),
    ("NVIDIA A100-PCIE-40GB", None, "a100-40gb"),
    ("Tesla V100-SXM2-16GB", 16160 * MiB, "v100-16gb"),
    ("Tesla V100-PCIE-32GB", 32768 * MiB, "v100-32gb"),
    ("Tesla T4", 15360 * MiB, "t4"),
    ("NVIDIA A10", 23028 * MiB, "a10"),
    ("NVIDIA L4", 23034 * MiB, "l4"),
    ("NVIDIA L40S", 46068 * MiB, "l40s"),
    ("NVIDIA RTX A6000", 49140 * MiB, "rtx-a6000"),
    ("NVIDIA RTX 6000 Ada Generation", 49140 * MiB, "rtx6000-ada"),
    ("NVIDIA TITAN RTX", 24576 * MiB, "titan-rtx"),
    ("AMD Radeon RX 7900 XTX", 24 * GiB, "rx7900xtx"),
    ("Radeon RX 7900 XT", 20 * GiB, "rx7900xt"),
    ("AMD Radeon RX 6800", 16 * GiB, "rx6800"),
    ("Apple M4 Max", 128 * GiB, "m4-max-128gb"),
    ("Apple M4 Max", 64 * GiB, "m4-max-64gb"),
    ("Apple M4 Pro", 48 * GiB, "m4-pro-48gb"),
])
def test_match_device_name_picks_the_memory_variant(name, memory, key):
    assert match_device_name(name, memory_bytes=memory).key == key


def test_catalog_import_stays_light():
    code = ("import sys, vramancer.devices.catalog as c; c.find_gpu('rtx3090'); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
