"""The public API is pinned, and importing it (or planning a catalog model) never imports torch."""
from __future__ import annotations

import json
import subprocess
import sys

import vramancer


def test_public_api_is_pinned():
    assert sorted(vramancer.__all__) == sorted([
        "__version__", "parse_devices", "profile", "plan", "load", "load_pipeline", "track",
        "Device", "ModelProfile", "BlockProfile", "Plan", "Stage", "Workload",
        "VramancerError", "BadInputError", "UnknownModelError", "MalformedCheckpointError", "DeviceSpecError",
        "WorkloadError", "DoesNotFitError", "CheckpointMismatchError", "DeviceOutOfMemoryError", "TraceFileError",
    ])
    for name in vramancer.__all__:
        assert hasattr(vramancer, name), name


def test_plan_takes_the_kv_dtype_as_the_cli_does():
    """``vramancer.plan(..., kv_dtype=)`` sizes the KV cache as ``plan --kv-dtype`` does (catalog model,
    nothing loaded): bf16 holds half of float32's KV bytes per stage."""
    kw = dict(devices="rtx3090,rtx3060", context=8192, dtype="float32")
    f32 = vramancer.plan("llama-3.1-8b", **kw)
    bf16 = vramancer.plan("llama-3.1-8b", kv_dtype="bf16", **kw)
    assert bf16.workload.kv_dtype == "bfloat16"
    assert sum(s.kv_cache_bytes for s in bf16.stages) * 2 == sum(s.kv_cache_bytes for s in f32.stages)


def test_error_exit_codes():
    assert vramancer.BadInputError("x").exit_code == 2
    assert vramancer.UnknownModelError("x").exit_code == 2
    assert vramancer.DoesNotFitError("x").exit_code == 3
    assert vramancer.VramancerError("x").exit_code == 1


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_does_not_import_torch():
    mods = _modules_after("import vramancer")
    assert "torch" not in mods and "transformers" not in mods


def test_planning_a_catalog_model_does_not_import_torch():
    mods = _modules_after(
        "from vramancer.cli import main\n"
        "main(['plan', 'llama-3.1-8b', '--devices', 'rtx3090,rtx3060', '--json'])")
    assert "torch" not in mods and "transformers" not in mods
