"""Host RAM before disk: with no GPU, a model that fits in host RAM never spreads onto disk (disk's
free fraction must not count as "headroom"; it once won ties on a CPU-only machine)."""
from __future__ import annotations

from vramancer.plan.planner import plan


def test_cpu_only_model_stays_in_host_ram(tmp_path):
    from tests.models.tiny import config, random_model

    random_model(config("llama")).save_pretrained(tmp_path)
    for devices in ("cpu:8GiB,disk:100GiB", "cpu:3GiB,disk:100GiB", "auto"):
        p = plan(str(tmp_path), devices=devices)
        assert [s.device for s in p.stages] == ["cpu"], devices
        assert not p.stream_buffers


def test_disk_only_when_host_ram_is_short():
    p = plan("llama-3.1-8b", devices="cpu:8GiB,disk:100GiB", dtype="bfloat16", context=2048)
    assert [s.device for s in p.stages][:1] == ["cpu"] and p.stages[-1].device == "disk"
