"""The GPU catalog: memory, memory bandwidth and dense FP16/BF16 throughput of the GPUs people own,
from the vendors' published specs, so a plan can simulate a GPU that is not in the machine.

Units: ``memory_bytes`` is the nominal capacity in binary units (a "24 GB" card = 24 * 2**30; the
driver reports a little less, which the real inventory measures). Bandwidths are bytes per second.
``tflops`` is dense FP16/BF16 matrix throughput with FP32 accumulate, no sparsity, at the reference
boost clock:

- NVIDIA GeForce (Turing, Ampere, Ada, Blackwell): the architecture whitepapers' "Peak FP16 Tensor
  TFLOPS with FP32 Accumulate" (GeForce runs FP32 accumulate at half the FP16-accumulate rate), i.e.
  SMs x boost clock x 512 FLOP/clk (Ampere/Ada/Blackwell) or tensor cores x clock x 64 (Turing).
- NVIDIA pro and data-center parts: the datasheet's dense FP16/BF16 tensor figure (sparse / 2).
- Pascal (GTX 10xx, no tensor cores, FP16 at 1/64 rate): the FP32 rate (cores x 2 x boost clock),
  since torch computes in fp32 there.
- AMD Radeon: AMD's "Peak Half Precision (FP16) Performance" (RDNA3 WMMA; RDNA2 packed FP16).
- Apple M-series: Apple publishes TFLOPS only for M1 (2.6); the others are the ALU rate
  (GPU cores x 128 lanes x 2 x GPU clock), FP16 runs at the FP32 rate on these GPUs.

``link_bandwidth_bytes_per_s``: host link, one direction, theoretical (PCIe 3.0 x16 = 15.75e9,
4.0 x16 = 31.5e9, 5.0 x16 = 63e9; x8 cards half). SXM parts: the host's PCIe generation. Apple: the
unified memory bandwidth (there is no copy over a bus).

Look-ups: ``find_gpu("RTX 3090")`` for names people type; ``match_device_name(name, memory_bytes)``
for names drivers report ("NVIDIA GeForce RTX 3060" + 12 GiB -> rtx3060-12gb).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["GpuSpec", "GPUS", "find_gpu", "match_device_name", "list_gpus", "normalize_gpu_name"]

Vendor = Literal["nvidia", "amd", "apple", "intel"]

_GiB = 2**30
PCIE3_X16 = 15.75e9
PCIE4_X8 = 15.75e9
PCIE4_X16 = 31.5e9
PCIE5_X8 = 31.5e9
PCIE5_X16 = 63e9


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model (one memory configuration)."""

    key: str
    name: str
    vendor: Vendor
    memory_bytes: int
    bandwidth_bytes_per_s: float
    tflops: float
    link_bandwidth_bytes_per_s: float
    arch: str
    unified_memory: bool = False
    aliases: tuple[str, ...] = ()


def _g(key: str, name: str, vendor: Vendor, mem_gib: int, bw_gbps: float, tflops: float, link: float,
       arch: str, aliases: tuple[str, ...] = (), unified: bool = False) -> GpuSpec:
    return GpuSpec(key=key, name=name, vendor=vendor, memory_bytes=mem_gib * _GiB,
                   bandwidth_bytes_per_s=bw_gbps * 1e9, tflops=tflops, link_bandwidth_bytes_per_s=link,
                   arch=arch, unified_memory=unified, aliases=aliases)


# fmt: off
_SPECS: tuple[GpuSpec, ...] = (
    # --- NVIDIA GeForce, Pascal: FP32 rate = CUDA cores x 2 x boost clock ----------------------------
    _g("gtx1060-6gb", "NVIDIA GeForce GTX 1060 6GB", "nvidia", 6, 192, 4.37, PCIE3_X16, "pascal",
       ("gtx1060",)),                                   # 1280 x 2 x 1.708 GHz; 8 Gbps x 192-bit
    _g("gtx1070", "NVIDIA GeForce GTX 1070", "nvidia", 8, 256, 6.46, PCIE3_X16, "pascal"),      # 1920 @ 1.683
    _g("gtx1080", "NVIDIA GeForce GTX 1080", "nvidia", 8, 320, 8.87, PCIE3_X16, "pascal"),      # 2560 @ 1.733
    _g("gtx1080ti", "NVIDIA GeForce GTX 1080 Ti", "nvidia", 11, 484, 11.34, PCIE3_X16, "pascal"),  # 3584 @ 1.582
    # --- Turing: FP16 tensor, FP32 accumulate (Turing whitepaper; tensor cores x clock x 64) ----------
    _g("rtx2060", "NVIDIA GeForce RTX 2060", "nvidia", 6, 336, 25.8, PCIE3_X16, "turing"),      # 240 TC @ 1.68
    _g("rtx2070", "NVIDIA GeForce RTX 2070", "nvidia", 8, 448, 29.9, PCIE3_X16, "turing"),      # 288 TC @ 1.62
    _g("rtx2080", "NVIDIA GeForce RTX 2080", "nvidia", 8, 448, 40.3, PCIE3_X16, "turing"),      # 368 TC @ 1.71
    _g("rtx2080ti", "NVIDIA GeForce RTX 2080 Ti", "nvidia", 11, 616, 53.8, PCIE3_X16, "turing"),  # 544 TC @ 1.545
    _g("titan-rtx", "NVIDIA TITAN RTX", "nvidia", 24, 672, 130.5, PCIE3_X16, "turing"),         # full-rate FP32 acc
    # --- Ampere GeForce: SMs x boost x 512 (GA10x whitepaper: RTX 3090 = 71 dense) ----------------
    _g("rtx3060-12gb", "NVIDIA GeForce RTX 3060 12GB", "nvidia", 12, 360, 25.5, PCIE4_X16, "ampere",
       ("rtx3060",)),                                   # 28 SM @ 1.777; 15 Gbps x 192-bit
    _g("rtx3060-8gb", "NVIDIA GeForce RTX 3060 8GB", "nvidia", 8, 240, 25.5, PCIE4_X16, "ampere"),  # 128-bit
    _g("rtx3060ti", "NVIDIA GeForce RTX 3060 Ti", "nvidia", 8, 448, 32.4, PCIE4_X16, "ampere"),     # 38 SM @ 1.665
    _g("rtx3070", "NVIDIA GeForce RTX 3070", "nvidia", 8, 448, 40.6, PCIE4_X16, "ampere"),          # 46 SM @ 1.725
    _g("rtx3080-10gb", "NVIDIA GeForce RTX 3080 10GB", "nvidia", 10, 760, 59.5, PCIE4_X16, "ampere",
       ("rtx3080",)),                                   # 68 SM @ 1.71; 19 Gbps x 320-bit
    _g("rtx3080-12gb", "NVIDIA GeForce RTX 3080 12GB", "nvidia", 12, 912, 61.3, PCIE4_X16, "ampere"),  # 70 SM
    _g("rtx3080ti", "NVIDIA GeForce RTX 3080 Ti", "nvidia", 12, 912, 68.2, PCIE4_X16, "ampere"),    # 80 SM @ 1.665
    _g("rtx3090", "NVIDIA GeForce RTX 3090", "nvidia", 24, 936, 71.0, PCIE4_X16, "ampere"),         # 82 SM @ 1.695
    _g("rtx3090ti", "NVIDIA GeForce RTX 3090 Ti", "nvidia", 24, 1008, 80.0, PCIE4_X16, "ampere"),   # 84 SM @ 1.86
    # --- Ada GeForce: SMs x boost x 512 (Ada whitepaper: RTX 4090 = 165.2, RTX 4080 = 97.5) -------
    _g("rtx4060", "NVIDIA GeForce RTX 4060", "nvidia", 8, 272, 30.2, PCIE4_X8, "ada"),              # 24 SM @ 2.46
    _g("rtx4060ti-8gb", "NVIDIA GeForce RTX 4060 Ti 8GB", "nvidia", 8, 288, 44.1, PCIE4_X8, "ada",
       ("rtx4060ti",)),                                 # 34 SM @ 2.535; 18 Gbps x 128-bit
    _g("rtx4060ti-16gb", "NVIDIA GeForce RTX 4060 Ti 16GB", "nvidia", 16, 288, 44.1, PCIE4_X8, "ada"),
    _g("rtx4070", "NVIDIA GeForce RTX 4070", "nvidia", 12, 504, 58.3, PCIE4_X16, "ada"),            # 46 SM @ 2.475
    _g("rtx4070-super", "NVIDIA GeForce RTX 4070 SUPER", "nvidia", 12, 504, 71.0, PCIE4_X16, "ada"),  # 56 SM
    _g("rtx4070ti", "NVIDIA GeForce RTX 4070 Ti", "nvidia", 12, 504, 80.2, PCIE4_X16, "ada"),       # 60 SM @ 2.61
    _g("rtx4070ti-super", "NVIDIA GeForce RTX 4070 Ti SUPER", "nvidia", 16, 672, 88.2, PCIE4_X16, "ada"),  # 66 SM
    _g("rtx4080", "NVIDIA GeForce RTX 4080", "nvidia", 16, 716.8, 97.5, PCIE4_X16, "ada"),          # 76 SM @ 2.505
    _g("rtx4080-super", "NVIDIA GeForce RTX 4080 SUPER", "nvidia", 16, 736, 104.4, PCIE4_X16, "ada"),  # 80 SM @ 2.55
    _g("rtx4090", "NVIDIA GeForce RTX 4090", "nvidia", 24, 1008, 165.2, PCIE4_X16, "ada"),          # 128 SM @ 2.52
    # --- Blackwell GeForce: SMs x boost x 512 (FP32 accumulate still half rate on GeForce) ---------
    _g("rtx5060ti-16gb", "NVIDIA GeForce RTX 5060 Ti 16GB", "nvidia", 16, 448, 47.4, PCIE5_X8, "blackwell",
       ("rtx5060ti",)),                                 # 36 SM @ 2.572; 28 Gbps x 128-bit
    _g("rtx5070", "NVIDIA GeForce RTX 5070", "nvidia", 12, 672, 61.7, PCIE5_X16, "blackwell"),      # 48 SM @ 2.512
    _g("rtx5070ti", "NVIDIA GeForce RTX 5070 Ti", "nvidia", 16, 896, 87.9, PCIE5_X16, "blackwell"),  # 70 SM @ 2.452
    _g("rtx5080", "NVIDIA GeForce RTX 5080", "nvidia", 16, 960, 112.6, PCIE5_X16, "blackwell"),     # 84 SM @ 2.617
    _g("rtx5090", "NVIDIA GeForce RTX 5090", "nvidia", 32, 1792, 209.5, PCIE5_X16, "blackwell"),    # 170 SM @ 2.407
    # --- AMD Radeon: AMD's "Peak Half Precision (FP16) Performance" --------------------------------
    _g("rx6700xt", "AMD Radeon RX 6700 XT", "amd", 12, 384, 26.43, PCIE4_X16, "rdna2", ("6700xt",)),
    _g("rx6800", "AMD Radeon RX 6800", "amd", 16, 512, 32.33, PCIE4_X16, "rdna2", ("6800",)),
    _g("rx6800xt", "AMD Radeon RX 6800 XT", "amd", 16, 512, 41.47, PCIE4_X16, "rdna2", ("6800xt",)),
    _g("rx6900xt", "AMD Radeon RX 6900 XT", "amd", 16, 512, 46.08, PCIE4_X16, "rdna2", ("6900xt",)),
    _g("rx7600", "AMD Radeon RX 7600", "amd", 8, 288, 43.5, PCIE4_X8, "rdna3", ("7600",)),
    _g("rx7800xt", "AMD Radeon RX 7800 XT", "amd", 16, 624, 74.65, PCIE4_X16, "rdna3", ("7800xt",)),
    _g("rx7900xt", "AMD Radeon RX 7900 XT", "amd", 20, 800, 103.0, PCIE4_X16, "rdna3", ("7900xt",)),
    _g("rx7900xtx", "AMD Radeon RX 7900 XTX", "amd", 24, 960, 122.8, PCIE4_X16, "rdna3", ("7900xtx",)),
    # --- NVIDIA workstation: datasheet dense FP16/BF16 tensor (full-rate FP32 accumulate) --------
    _g("rtx-a4000", "NVIDIA RTX A4000", "nvidia", 16, 448, 76.7, PCIE4_X16, "ampere", ("a4000",)),
    _g("rtx-a5000", "NVIDIA RTX A5000", "nvidia", 24, 768, 111.1, PCIE4_X16, "ampere", ("a5000",)),
    _g("rtx-a6000", "NVIDIA RTX A6000", "nvidia", 48, 768, 154.8, PCIE4_X16, "ampere", ("a6000",)),
    _g("rtx6000-ada", "NVIDIA RTX 6000 Ada Generation", "nvidia", 48, 960, 364.2, PCIE4_X16, "ada",
       ("rtx6000ada",)),
    # --- NVIDIA data center: datasheet dense FP16/BF16 tensor ------------------------------------
    _g("t4", "NVIDIA Tesla T4", "nvidia", 16, 320, 65.0, PCIE3_X16, "turing", ("tesla-t4",)),
    _g("v100-16gb", "NVIDIA Tesla V100 SXM2 16GB", "nvidia", 16, 900, 125.0, PCIE3_X16, "volta",
       ("v100",)),
    _g("v100-32gb", "NVIDIA Tesla V100 SXM2 32GB", "nvidia", 32, 900, 125.0, PCIE3_X16, "volta"),
    _g("a10", "NVIDIA A10", "nvidia", 24, 600, 125.0, PCIE4_X16, "ampere"),
    _g("a100-40gb", "NVIDIA A100 SXM4 40GB", "nvidia", 40, 1555, 312.0, PCIE4_X16, "ampere"),
    _g("a100-80gb", "NVIDIA A100 SXM4 80GB", "nvidia", 80, 2039, 312.0, PCIE4_X16, "ampere", ("a100",)),
    _g("h100-pcie", "NVIDIA H100 PCIe 80GB", "nvidia", 80, 2000, 756.0, PCIE5_X16, "hopper"),
    _g("h100", "NVIDIA H100 SXM5 80GB", "nvidia", 80, 3350, 989.4, PCIE5_X16, "hopper",
       ("h100-sxm", "h100-80gb")),
    _g("h200", "NVIDIA H200 SXM 141GB", "nvidia", 141, 4800, 989.4, PCIE5_X16, "hopper", ("h200-sxm",)),
    _g("l4", "NVIDIA L4", "nvidia", 24, 300, 121.0, PCIE4_X16, "ada"),
    _g("l40s", "NVIDIA L40S", "nvidia", 48, 864, 362.05, PCIE4_X16, "ada"),
    # --- Apple M-series (unified memory; memory_bytes = that configuration's RAM) -----------------
    _g("m1-16gb", "Apple M1 16GB", "apple", 16, 68.25, 2.6, 68.25e9, "apple-g13", ("m1",), unified=True),
    _g("m2-pro-32gb", "Apple M2 Pro 32GB", "apple", 32, 200, 6.8, 200e9, "apple-g14",
       ("m2-pro",), unified=True),                      # 19-core GPU x 128 x 2 x 1.398 GHz
    _g("m3-max-64gb", "Apple M3 Max 64GB", "apple", 64, 400, 14.3, 400e9, "apple-g15",
       ("m3-max",), unified=True),                      # 40-core GPU @ 1.398 GHz
    _g("m4-pro-24gb", "Apple M4 Pro 24GB", "apple", 24, 273, 7.5, 273e9, "apple-g16",
       ("m4-pro",), unified=True),                      # 20-core GPU @ ~1.47 GHz
    _g("m4-pro-48gb", "Apple M4 Pro 48GB", "apple", 48, 273, 7.5, 273e9, "apple-g16", unified=True),
    _g("m4-max-64gb", "Apple M4 Max 64GB", "apple", 64, 546, 17.2, 546e9, "apple-g16",
       ("m4-max",), unified=True),                      # 40-core GPU @ ~1.68 GHz
    _g("m4-max-128gb", "Apple M4 Max 128GB", "apple", 128, 546, 17.2, 546e9, "apple-g16", unified=True),
)
# fmt: on

GPUS: dict[str, GpuSpec] = {s.key: s for s in _SPECS}

# Words that carry no model identity: vendor and product-line prefixes drivers put in names.
_VENDOR_WORDS = ("nvidia", "geforce", "amd", "ati", "radeon", "tesla", "apple", "graphics", "generation")
_VENDOR_PREFIXES = ("nvidia", "geforce", "amd", "radeon", "tesla", "apple")
_MEM_WORD_RE = re.compile(r"^(\d+)(gb|g|gib)$")
_MEM_TYPE_WORDS = ("hbm2", "hbm2e", "hbm3", "hbm3e", "gddr6", "gddr6x", "gddr7")
_FORMS = {"sxm": "sxm", "sxm2": "sxm", "sxm4": "sxm", "sxm5": "sxm", "pcie": "pcie", "nvl": "nvl"}
_BARE_NUMBER_RE = re.compile(r"^\d{4}(ti|super|tisuper|xt|xtx)?$")


def normalize_gpu_name(name: str) -> str:
    """"NVIDIA GeForce RTX 3090" / "geforce-rtx-3090" / "RTX 3090" -> "rtx3090": lower case, only
    letters and digits, vendor prefixes dropped."""
    s = re.sub(r"\((tm|r)\)", "", str(name).lower())
    s = re.sub(r"[^a-z0-9]", "", s)
    changed = True
    while changed:
        changed = False
        for p in _VENDOR_PREFIXES:
            if s.startswith(p) and len(s) > len(p):
                s = s[len(p):]
                changed = True
    return s


def _build_index() -> dict[str, GpuSpec]:
    index: dict[str, GpuSpec] = {}
    for spec in _SPECS:
        for text in (spec.key, spec.name, *spec.aliases):
            index.setdefault(normalize_gpu_name(text), spec)
    return index


_INDEX = _build_index()


@dataclass(frozen=True)
class _Parsed:
    model: str               # "rtx3060", "a100", "h100", "rx7900xtx", "m3max"
    form: str | None         # "sxm" | "pcie" | "nvl" | None
    memory_gib: int | None   # a memory size written in the name ("80GB")


def _parse(name: str) -> _Parsed:
    """Split a driver-reported name into model words, form factor and memory size:
    "NVIDIA A100-SXM4-80GB" -> (a100, sxm, 80); "NVIDIA H100 80GB HBM3" -> (h100, None, 80)."""
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"\((tm|r)\)", "", str(name).lower())) if w]
    model, form, mem = [], None, None
    for w in words:
        m = _MEM_WORD_RE.match(w)
        if m:
            mem = int(m.group(1))
        elif w in _FORMS:
            form = _FORMS[w]
        elif w in _VENDOR_WORDS or w in _MEM_TYPE_WORDS:
            continue
        else:
            model.append(w)
    return _Parsed("".join(model), form, mem)


_PARSED: dict[str, _Parsed] = {s.key: _parse(s.name) for s in _SPECS}


def find_gpu(name: str) -> GpuSpec | None:
    """The catalog GPU a person means: key, alias or vendor name, any case, spaces or dashes
    ("RTX 3090", "geforce-rtx-3090", "rtx3090", "NVIDIA GeForce RTX 3090"; "rtx3060" is the 12 GB one;
    a bare "3090" too). Falls back to :func:`match_device_name` for driver-style names. None if unknown."""
    n = normalize_gpu_name(name)
    if not n:
        return None
    spec = _INDEX.get(n)
    if spec is not None:
        return spec
    if _BARE_NUMBER_RE.match(n):
        for prefix in ("rtx", "gtx", "rx"):
            spec = _INDEX.get(prefix + n)
            if spec is not None:
                return spec
    return match_device_name(name)


def match_device_name(name: str, memory_bytes: int | None = None) -> GpuSpec | None:
    """The catalog GPU for a name a driver reports (NVML, ROCm, torch): "NVIDIA GeForce RTX 3060",
    "NVIDIA H100 80GB HBM3", "AMD Radeon RX 7900 XTX", "Tesla V100-SXM2-32GB". Where a model comes
    in several memory sizes, ``memory_bytes`` (the driver's total) or a size in the name picks the
    nearest one; without either, the model's default variant (what ``find_gpu`` of the model gives).
    None if the model is not in the catalog."""
    if not name or not str(name).strip():
        return None
    exact = _INDEX.get(normalize_gpu_name(name))
    p = _parse(name)
    if not p.model:
        return exact
    candidates = [s for s in _SPECS if _PARSED[s.key].model == p.model]
    if not candidates:
        return exact
    if p.form is not None:
        same_form = [s for s in candidates if _PARSED[s.key].form == p.form]
        if same_form:
            candidates = same_form
    # the variant meant when nothing else decides: the exact name, else the model's default key
    preferred = exact if exact in candidates else _INDEX.get(p.model)
    target = memory_bytes if memory_bytes else (p.memory_gib * _GiB if p.memory_gib else None)
    if target and target > 0:
        return min(candidates, key=lambda s: (round(abs(math.log(s.memory_bytes / target)), 6),
                                              s is not preferred))
    if preferred in candidates:
        return preferred
    return candidates[0]


def list_gpus() -> list[GpuSpec]:
    """Every catalog GPU, in catalog order (vendor, then generation)."""
    return list(_SPECS)
