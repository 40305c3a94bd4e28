"""Exports of a placement for people who stay on other engines: a transformers/accelerate
``device_map``, llama.cpp flags and vLLM's pipeline layer partition."""
from __future__ import annotations

from ..devices.device import Device
from ..models.profile import ModelProfile

__all__ = ["engine_device_names", "device_map", "llama_cpp_flags", "vllm_layer_partition"]


def engine_device_names(devices: list[Device]) -> dict[str, str]:
    """Device id -> the name another engine uses on the person's machine. Real GPUs keep theirs;
    simulated GPUs are numbered cuda:0, cuda:1, ... in the order the spec listed them (that is
    how they would enumerate once installed); host RAM is "cpu", the disk tier "disk"."""
    names: dict[str, str] = {}
    next_index = 0
    used = {d.torch_device for d in devices if d.kind == "gpu" and not d.simulated}
    for d in devices:
        if d.kind == "cpu":
            names[d.id] = "cpu"
        elif d.kind == "disk":
            names[d.id] = "disk"
        elif not d.simulated:
            names[d.id] = d.torch_device
        else:
            while f"cuda:{next_index}" in used:
                next_index += 1
            names[d.id] = f"cuda:{next_index}"
            next_index += 1
    return names


def device_map(profile: ModelProfile, block_device: list[str], names: dict[str, str]) -> dict[str, str]:
    """{module prefix: device} for every module of every block."""
    out: dict[str, str] = {}
    for block, dev in zip(profile.blocks, block_device):
        for module in block.modules or [block.name]:
            out[module] = names[dev]
    return out


def _layers_per_gpu(profile: ModelProfile, stages: list[tuple[str, int, int]], devices: list[Device]) -> dict[str, int]:
    """Repeated layers (blocks 1..n-2) per GPU device id."""
    last = profile.num_blocks - 1
    counts: dict[str, int] = {d.id: 0 for d in devices if d.kind == "gpu"}
    for dev, start, end in stages:
        if dev in counts:
            counts[dev] += len(range(max(start, 1), min(end, last)))
    return counts


def llama_cpp_flags(profile: ModelProfile, stages: list[tuple[str, int, int]], devices: list[Device],
                    context: int, batch: int = 1, kv_dtype: str | None = None) -> str:
    """``--tensor-split`` proportions in GPU enumeration order, ``-ngl`` (layers on GPUs, +1 for the
    output layer when the head is on a GPU), ``-c`` the context (llama.cpp's total over its slots),
    ``-ctk/-ctv`` the ``--kv-dtype`` when llama.cpp has it (fp8: it has no such cache type)."""
    counts = _layers_per_gpu(profile, stages, devices)
    gpus = [d for d in devices if d.kind == "gpu"]
    head_on_gpu = any(dev in counts and start <= profile.num_blocks - 1 < end for dev, start, end in stages)
    ngl = sum(counts.values()) + (1 if head_on_gpu else 0)
    parts = []
    if len(gpus) > 1:
        parts.append("--tensor-split " + ",".join(str(counts[d.id]) for d in gpus))
    parts.append(f"-ngl {ngl}")
    parts.append(f"-c {context * batch}")
    if batch > 1:
        parts.append(f"-np {batch}")
    cache = {"q8_0": "q8_0", "bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(kv_dtype or "")
    if cache:
        parts.append(f"-ctk {cache} -ctv {cache}")
    return " ".join(parts)


def vllm_layer_partition(profile: ModelProfile, stages: list[tuple[str, int, int]], devices: list[Device]) -> str:
    """VLLM_PP_LAYER_PARTITION: layers per pipeline stage, GPU stages in pipeline order."""
    gpu_ids = {d.id for d in devices if d.kind == "gpu"}
    last = profile.num_blocks - 1
    return ",".join(str(len(range(max(s, 1), min(e, last)))) for dev, s, e in stages if dev in gpu_ids)
