"""Plan JSON schema 2: what the planner hands the runtime (block modules, the mode and compute
device each stage really runs with, one stream buffer per streaming device, the model's identity),
a round trip that keeps all of it, and every hand-edited file of the wrong shape refused in one
BadInputError line (never a KeyError / TypeError / RecursionError)."""
from __future__ import annotations

import copy
import json
import random

import pytest

from vramancer.errors import BadInputError
from vramancer.plan.plan import (
    HOST_COMPUTE,
    PLAN_SCHEMA,
    ModelIdentity,
    Plan,
    PlanBlock,
    Prediction,
    StreamBuffer,
    Workload,
    config_sha256,
)
from vramancer.plan.planner import plan_placement, plan_profile

from .synthetic import GiB, cpu, disk, gpu, synthetic_profile


def _offload_plan() -> Plan:
    """Blocks on a GPU, then host RAM and disk, both streamed to the GPU (one buffer)."""
    prof = synthetic_profile([GiB] * 6, embed_bytes=GiB // 2, head_bytes=GiB // 4, kv_per_token=1024)
    devs = [gpu("a", 8 * GiB), cpu(64 * GiB), disk(500 * GiB)]
    blocks = ["a"] * 3 + ["cpu"] * 3 + ["disk"] * 2
    return plan_placement(prof, devs, Workload(context=256), blocks, offload_mode="stream")


def test_plan_carries_what_the_runtime_reads():
    plan = _offload_plan()
    assert [(s.device, s.mode, s.compute_device) for s in plan.stages] == \
        [("a", "execute", "a"), ("cpu", "stream", "a"), ("disk", "stream", "a")]
    # one stream buffer on the GPU, for both streamed stages: two slots of the largest streamed block
    assert plan.stream_buffers == [StreamBuffer("a", 2 * GiB, (1, 2))]
    assert plan.stream_buffers[0].slot_bytes == GiB
    # the buffer is the plan's, not in any stage's activation bytes, and counted on the GPU once
    used = plan.device_used_bytes()
    assert used["a"] == plan.stages[0].total_bytes + 2 * GiB
    assert [b.modules for b in plan.blocks][:2] == [("model.embed_tokens",), ("model.layers.0",)]
    assert [b.device for b in plan.blocks] == ["a"] * 3 + ["cpu"] * 3 + ["disk"] * 2
    assert isinstance(plan.predicted, Prediction) and plan.predicted.decode_tokens_per_s > 0
    assert plan.identity == ModelIdentity(None, "bfloat16")    # a synthetic profile has no config


def test_disk_streams_to_the_host_without_a_gpu():
    prof = synthetic_profile([GiB] * 3)
    only_disk = plan_profile(prof, [disk(500 * GiB)], Workload(context=64))
    (st,) = only_disk.stages
    assert (st.mode, st.compute_device) == ("stream", HOST_COMPUTE)
    assert only_disk.stream_buffers == [StreamBuffer(HOST_COMPUTE, 2 * GiB, (0,))]
    with_host = plan_placement(prof, [cpu(2 * GiB), disk(500 * GiB)], Workload(context=64),
                               ["cpu", "cpu", "disk", "disk", "disk"], offload_mode="execute")
    assert [(s.mode, s.compute_device) for s in with_host.stages] == [("execute", "cpu"), ("stream", "cpu")]
    assert with_host.stream_buffers == [StreamBuffer("cpu", 2 * GiB, (1,))]
    for p in (only_disk, with_host):
        assert Plan.from_json(p.to_json()).to_dict() == p.to_dict()


def test_round_trip_keeps_every_field(tmp_path):
    plan = _offload_plan()
    plan.identity = ModelIdentity(config_sha256({"model_type": "llama", "hidden_size": 8}), "bfloat16")
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan
    d = json.loads(path.read_text())
    assert d["schema"] == PLAN_SCHEMA == 2
    assert d["predicted"].keys() == {"decode_tokens_per_s", "prefill_tokens_per_s", "decode_ms_per_step",
                                     "bottleneck_stage"}
    assert d["blocks"][1] == {"name": "model.layers.0", "weights_bytes": GiB, "shared_bytes": 0,
                              "kv_bytes_per_token": 1024, "device": "a", "modules": ["model.layers.0"],
                              "layer_index": None}
    assert d["stream_buffers"] == [{"device": "a", "buffer_bytes": 2 * GiB, "stages": [1, 2]}]


def test_head_back_placement_is_valid():
    """The planner may bring the head back to a GPU that holds an earlier stage: the device
    appears twice, the stages still cover the blocks in order, once each."""
    prof = synthetic_profile([GiB] * 4, embed_bytes=GiB, tied=True)
    devs = [gpu("a", 4 * GiB), cpu(64 * GiB)]
    plan = plan_placement(prof, devs, Workload(context=64), ["a", "a", "cpu", "cpu", "cpu", "a"],
                          offload_mode="execute")
    assert [(s.device, s.blocks) for s in plan.stages] == [("a", (0, 2)), ("cpu", (2, 5)), ("a", (5, 6))]
    assert Plan.from_dict(json.loads(plan.to_json())).to_dict() == plan.to_dict()


def test_config_hash_ignores_where_and_how_it_was_saved():
    a = {"model_type": "llama", "hidden_size": 64, "_name_or_path": "/x", "transformers_version": "4.1",
         "dtype": "bfloat16", "text_config": {"torch_dtype": "float16", "n": 1}}
    b = {"text_config": {"n": 1}, "hidden_size": 64, "model_type": "llama", "_name_or_path": "/elsewhere"}
    assert config_sha256(a) == config_sha256(b)
    assert config_sha256(a) != config_sha256(dict(b, hidden_size=65))
    assert ModelIdentity.of(a, "float32").short == f"config {config_sha256(a)[:8]}…"


def test_schema_1_is_refused_with_the_command_to_re_plan():
    d = _offload_plan().to_dict()
    d["schema"] = 1
    with pytest.raises(BadInputError) as e:
        Plan.from_dict(d)
    msg = str(e.value)
    assert "schema 1" in msg and "re-plan" in msg and "vramancer plan" in msg and "\n" not in msg


def _set(path: str, value):
    def edit(d: dict) -> None:
        keys = path.split(".")
        obj = d
        for k in keys[:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        last = keys[-1]
        if value is _DELETE:
            del obj[int(last) if isinstance(obj, list) else last]
        elif isinstance(obj, list):
            obj[int(last)] = value
        else:
            obj[last] = value
    return edit


_DELETE = object()
NAN = float("nan")

BAD_EDITS = {
    "stage gap": (_set("stages.1.blocks", [4, 6]), "should start at block 3"),
    "stage overlap": (_set("stages.1.blocks", [2, 6]), "should start at block 3"),
    "empty stage": (_set("stages.2.blocks", [6, 6]), "at least one"),
    "blocks left over": (_set("stages.2.blocks", [6, 7]), "cover blocks [0, 7)"),
    "block beyond the model": (_set("stages.2.blocks", [6, 9]), "outside"),
    "negative bytes": (_set("stages.0.weights_bytes", -1), "outside"),
    "NaN bytes": (_set("stages.0.kv_cache_bytes", NAN), "whole number"),
    "string bytes": (_set("blocks.0.weights_bytes", "1GiB"), "whole number"),
    "bool bytes": (_set("stages.0.reserve_bytes", True), "whole number"),
    "float bytes": (_set("stages.0.capacity_bytes", 1.5), "whole number"),
    "huge bytes": (_set("stages.0.capacity_bytes", 10**30), "outside"),
    "NaN speed": (_set("predicted.decode_tokens_per_s", NAN), "outside"),
    "infinite seconds": (_set("stages.1.decode_seconds", float("inf")), "outside"),
    "unknown stage device": (_set("stages.0.device", "rtx9999"), "not among the plan's devices"),
    "unknown compute device": (_set("stages.1.compute_device", "nowhere"), "cannot run"),
    "stream to the host from RAM": (_set("stages.1.compute_device", "cpu"), "cannot run"),
    "wrong kind": (_set("stages.0.kind", "cpu"), "is a gpu"),
    "unknown mode": (_set("stages.1.mode", "teleport"), "not one of"),
    "disk executes": (_set("stages.2.mode", "execute"), "always streams"),
    "GPU streams": (_set("stages.0.mode", "stream"), "executes"),
    "execute elsewhere": (_set("stages.0.compute_device", "cpu"), "its own device"),
    "block on another device": (_set("blocks.3.device", "a"), "its stage 1"),
    "no stream buffer": (_set("stream_buffers", []), "none on a"),
    "two stream buffers": (lambda d: d["stream_buffers"].append(dict(d["stream_buffers"][0])), "second buffer"),
    "buffer for other stages": (_set("stream_buffers.0.stages", [1]), "stages streamed"),
    "buffer without stages": (lambda d: d["stream_buffers"].append({"device": "ghost", "buffer_bytes": 1,
                                                                     "stages": []}), "stages"),
    "negative buffer": (_set("stream_buffers.0.buffer_bytes", -5), "outside"),
    "buffer too small": (_set("stream_buffers.0.buffer_bytes", 2**30), "two slots of the largest"),
    "buffer beyond its device": (_set("stream_buffers.0.buffer_bytes", 2**61), "two slots of the largest"),
    "unknown dtype": (_set("workload.dtype", "float7"), "unknown dtype"),
    "zero context": (_set("workload.context", 0), "outside"),
    "objective": (_set("workload.objective", "fast"), "not one of"),
    "workload a list": (_set("workload", [1, 2]), "expected an object"),
    "stages not a list": (_set("stages", {"0": 1}), "expected a list"),
    "stage a string": (_set("stages.0", "gpu"), "expected an object"),
    "missing key": (_set("stages.0.mode", _DELETE), "missing"),
    "missing blocks": (_set("blocks", _DELETE), "missing"),
    "no blocks": (_set("blocks", []), "outside"),
    "modules not strings": (_set("blocks.1.modules", [1]), "expected a string"),
    "duplicate layer": (lambda d: [b.update(layer_index=3) for b in d["blocks"][1:3]], "another block's"),
    "bad hash": (_set("identity.config_sha256", "abc"), "64 lowercase hex"),
    "dtype differs": (_set("identity.dtype", "float32"), "identity.dtype"),
    "bottleneck": (_set("predicted.bottleneck_stage", 7), "not a stage"),
    "two devices one id": (lambda d: d["devices"].append(dict(d["devices"][0])), "same id"),
    "device bandwidth": (_set("devices.0.bandwidth_bytes_per_s", -1.0), "outside"),
    "device torch name": (_set("devices.0.torch_device", "cuda:0; rm -rf"), "not a torch device"),
    "torch device differs": (_set("stages.0.torch_device", "cuda:3"), "torch_device"),
    "manual split NaN": (_set("manual_split", [1, NAN]), "outside"),
    "notes not strings": (_set("notes", [{"a": 1}]), "expected a string"),
    "device_map of lists": (_set("device_map", {"x": [1]}), "object of strings"),
    "not a plan": (lambda d: d.clear(), "schema"),
}


@pytest.mark.parametrize("name", list(BAD_EDITS))
def test_hand_edited_plans_are_refused_in_one_line(name):
    edit, words = BAD_EDITS[name]
    d = _offload_plan().to_dict()
    edit(d)
    with pytest.raises(BadInputError) as e:
        Plan.from_json(json.dumps(d))
    msg = str(e.value)
    assert "\n" not in msg and words in msg, msg


def test_deeply_nested_and_broken_files_are_refused(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for text in ("[" * 100_000 + "]" * 100_000, '{"schema": 2, "blocks": ' + "[" * 5000 + "]" * 5000 + "}",
                 "", "{", "\xff", '"plan"', "[]", "null"):
        with pytest.raises(BadInputError) as e:
            Plan.from_json(text)
        assert "\n" not in str(e.value)
    with pytest.raises(BadInputError) as e:
        Plan.load(deep)
    assert "nested deeper" in str(e.value)
    with pytest.raises(BadInputError):
        Plan.load(tmp_path / "missing.json")


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    yield path


def test_any_single_edit_loads_or_is_refused_cleanly():
    """Every field of a valid plan replaced by values of every JSON type: the result is a valid
    plan (whose parts agree and serialise) or one BadInputError line, nothing else."""
    base = _offload_plan().to_dict()
    values = [None, True, -1, 0, 3, 2**70, 1.5, NAN, "", "a", "stream", [], [0, 1], {}, {"a": 1}]
    rng = random.Random(8)
    paths = [p for p in _leaves(base) if p]
    for path in paths:
        for v in rng.sample(values, 5):
            d = copy.deepcopy(base)
            obj = d
            for k in path[:-1]:
                obj = obj[k]
            obj[path[-1]] = v
            try:
                plan = Plan.from_dict(d)
            except BadInputError as e:
                assert "\n" not in str(e)
                continue
            plan.validate()
            assert json.loads(plan.to_json())["schema"] == PLAN_SCHEMA
            assert all(isinstance(b, PlanBlock) for b in plan.blocks)
