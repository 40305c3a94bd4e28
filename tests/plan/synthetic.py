"""Synthetic profiles for planner tests: block sizes chosen freely, no model needed."""
from __future__ import annotations

from vramancer.devices.device import Device
from vramancer.models.profile import BlockProfile, ModelProfile

GiB = 2**30


def synthetic_profile(layer_bytes: list[int], embed_bytes: int = 0, head_bytes: int = 0,
                      kv_per_token: int = 0, act_per_token: int = 0, logits_per_token: int = 0,
                      tied: bool = False, hidden: int = 1024) -> ModelProfile:
    blocks = [BlockProfile("embed", 0 if tied else embed_bytes, modules=["model.embed_tokens"],
                           shared={"embed": embed_bytes} if tied else {},
                           read_bytes_per_token=hidden * 2, params=embed_bytes // 2)]
    for i, w in enumerate(layer_bytes):
        blocks.append(BlockProfile(f"model.layers.{i}", w, modules=[f"model.layers.{i}"],
                                   kv_bytes_per_token=kv_per_token, act_bytes_per_token=act_per_token,
                                   flops_per_token=float(w), read_bytes_per_token=w, params=w // 2))
    blocks.append(BlockProfile("head", 0 if tied else head_bytes, modules=["model.norm", "lm_head"],
                               shared={"embed": embed_bytes} if tied else {},
                               logits_bytes_per_token=logits_per_token,
                               flops_per_token=float(head_bytes), read_bytes_per_token=head_bytes or embed_bytes,
                               params=head_bytes // 2))
    return ModelProfile(name="synthetic", arch="llama", kind="causal-lm", dtype="bfloat16", blocks=blocks,
                        source="module", hidden_size=hidden, num_layers=len(layer_bytes), vocab_size=1000)


def gpu(name: str, mem: int, bw: float = 500e9, tflops: float = 50.0) -> Device:
    return Device(id=name, name=name, kind="gpu", total_bytes=mem, free_bytes=mem,
                  bandwidth_bytes_per_s=bw, tflops=tflops, simulated=True, backing="cpu",
                  torch_device="cpu", link_bandwidth_bytes_per_s=25e9)


def cpu(mem: int) -> Device:
    return Device(id="cpu", name="cpu", kind="cpu", total_bytes=mem, free_bytes=mem,
                  bandwidth_bytes_per_s=40e9, tflops=1.0, simulated=True, backing="cpu",
                  torch_device="cpu", link_bandwidth_bytes_per_s=40e9)


def disk(mem: int) -> Device:
    return Device(id="disk", name="disk", kind="disk", total_bytes=mem, free_bytes=mem,
                  bandwidth_bytes_per_s=2e9, tflops=0.0, simulated=True, backing="cpu",
                  torch_device="cpu", link_bandwidth_bytes_per_s=2e9)
