"""Device spec parsing: every form of docs/architecture.md, errors, and the round trip."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramancer.devices.catalog import list_gpus
from vramancer.devices.spec import format_devices, parse_devices
from vramancer.errors import DeviceSpecError

GiB = 2**30


def test_catalog_gpus_simulated_and_numbered():
    devs = parse_devices("rtx3090,rtx3060,rtx3060")
    assert [d.id for d in devs] == ["rtx3090#0", "rtx3060-12gb#0", "rtx3060-12gb#1"]
    assert all(d.simulated and d.kind == "gpu" and d.torch_device == "cpu" for d in devs)
    assert devs[0].total_bytes == 24 * GiB and devs[0].free_bytes == 24 * GiB
    assert devs[0].bandwidth_bytes_per_s == pytest.approx(936e9, rel=0.01)


def test_memory_override_is_memory_available_to_us():
    (d,) = parse_devices("rtx3060:10GiB")
    assert d.free_bytes == 10 * GiB
    assert d.total_bytes == 12 * GiB


def test_custom_device():
    (d,) = parse_devices("mygpu:16GiB@448GBps@30TFLOPS")
    assert (d.id, d.total_bytes, d.bandwidth_bytes_per_s, d.tflops) == ("mygpu#0", 16 * GiB, 448e9, 30.0)


def test_cpu_and_disk_tiers():
    cpu, disk = parse_devices("cpu:64GiB,disk:500GiB")
    assert (cpu.kind, cpu.total_bytes, cpu.free_bytes) == ("cpu", 64 * GiB, 64 * GiB)
    assert (disk.kind, disk.total_bytes) == ("disk", 500 * GiB)
    real_cpu = parse_devices("cpu")[0]
    assert real_cpu.kind == "cpu" and real_cpu.total_bytes > 0


def test_backing_device_is_recorded():
    (d,) = parse_devices("rtx4090", backing="cuda:0")
    assert d.torch_device == "cuda:0" and d.backing == "cuda:0"


@pytest.mark.parametrize("spec", ["", "rtx9999", "mygpu:16GiB@abc@30TFLOPS", "rtx3090:-5GiB", "rtx3090:12XB",
                                  "cuda:7", "cpu,cpu", "rtx3090,,rtx3060", "mygpu:0GiB@100GBps@1TFLOPS"])
def test_bad_specs_are_one_clear_error(spec):
    with pytest.raises(DeviceSpecError) as e:
        parse_devices(spec)
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2


keys = st.sampled_from(sorted(g.key for g in list_gpus()))


@settings(max_examples=50, deadline=None)
@given(items=st.lists(st.one_of(
    st.tuples(keys, st.none()),
    st.tuples(keys, st.integers(min_value=1, max_value=64 * 1024).map(lambda m: m * 2**20)),
), min_size=1, max_size=6), cpu=st.one_of(st.none(), st.integers(min_value=1, max_value=512)))
def test_round_trip(items, cpu):
    spec = ",".join(k if m is None else f"{k}:{m}B" for k, m in items)
    if cpu:
        spec += f",cpu:{cpu}GiB"
    devs = parse_devices(spec)
    again = parse_devices(format_devices(devs))
    assert [d.to_dict() for d in again] == [d.to_dict() for d in devs]
