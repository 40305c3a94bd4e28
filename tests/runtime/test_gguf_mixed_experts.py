"""A Mixtral GGUF whose gate and up experts differ in type (llama.cpp's Q4_K_M / Q3_K_M mixes give
tensors of one layer different types), written with gguf-py's GGUFWriter from the llama.cpp fixture
``mixtral-F32.gguf``: its metadata and tensors as they are, the stacked experts re-quantized by
gguf.quants (gate Q8_0, up Q4_0, down Q5_0). It loads (it was refused: load.py stacked gate and up into
one tensor of one type) with the gate and up blocks side by side in one stored tensor
(runtime/gguf/stacked.py), its bytes the file's; logits and greedy tokens equal gguf-py's dequantized
float model; the experts kept in host RAM run by the host path (each selected expert's halves
dequantized; a long prompt's prefill copies the stored experts to the GPU) give the same tokens,
bytes per device equal to the plan's."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from .gguf_reference import check_gguf_bytes, dequantize_into  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gguf"
_spec = importlib.util.spec_from_file_location("gguf_fixtures_make_mixed", FIXTURES / "make.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)

TYPES = {"ffn_gate_exps": "Q8_0", "ffn_up_exps": "Q4_0", "ffn_down_exps": "Q5_0"}
PROMPT = torch.tensor([[1, 17, 40, 99, 150, 7]])
NEW_TOKENS = 8


def write_mixed(src: Path, dst: Path, types: dict[str, str]) -> Path:
    """``src`` rewritten by GGUFWriter: every metadata field and tensor copied, the tensors named
    ``blk.N.<kind>.weight`` for ``kind`` in ``types`` quantized to that type by gguf.quants."""
    from gguf.quants import quantize

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        kind = str(t.name).split(".")[2] if str(t.name).startswith("blk.") else ""
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        values = t.data.astype("float32")
        if kind in types:
            qt = getattr(gguf.GGMLQuantizationType, types[kind])
            writer.add_tensor(str(t.name), quantize(values, qt), raw_dtype=qt)
        else:
            writer.add_tensor(str(t.name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return write_mixed(make.fixture("mixtral", "F32"), tmp_path_factory.mktemp("mixed") / "mixtral-mixed.gguf", TYPES)


@pytest.fixture(scope="module")
def reference(mixed):
    """The float model the file stands for: gguf-py's dequantization of its tensors (gguf_reference)."""
    return dequantize_into(make.source_model("mixtral"), mixed)


def _greedy(model, ids) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_the_file_mixes_types(mixed):
    types = {str(t.name): t.tensor_type.name for t in gguf.GGUFReader(str(mixed)).tensors}
    for i in (0, 1):
        assert {k: types[f"blk.{i}.{k}.weight"] for k in TYPES} == TYPES
    assert types["blk.0.attn_q.weight"] == "F32"


def test_mixed_gate_up_loads_and_equals_the_dequantized_model(mixed, reference):
    from vramancer.runtime.gguf.stacked import GGUFGateUp
    from vramancer.runtime.loader import load

    model = load(str(mixed), devices="rtx3060,rtx3060", split=[1, 1], context=64, backing="cpu", dtype="float32")
    exp = model.get_submodule("model.layers.0.mlp.experts")
    par = exp.parametrizations.gate_up_proj
    assert type(par[0]) is GGUFGateUp and par.original.dtype == torch.uint8
    reader = {str(t.name): t for t in gguf.GGUFReader(str(mixed)).tensors}
    gate, up = reader["blk.0.ffn_gate_exps.weight"], reader["blk.0.ffn_up_exps.weight"]
    assert par.original.numel() == int(gate.n_bytes) + int(up.n_bytes)
    with torch.no_grad():
        assert torch.equal(exp.gate_up_proj, reference.get_submodule("model.layers.0.mlp.experts").gate_up_proj)
        assert torch.equal(model(PROMPT).logits, reference(PROMPT).logits)
    assert _greedy(model, PROMPT) == _greedy(reference, PROMPT)
    check_gguf_bytes(model, mixed)
    model.vramancer.detach()


def test_mixed_experts_in_host_ram(mixed, reference):
    """The planner's experts-in-host-RAM plan of the mixed file: the host path dequantizes each selected
    expert's gate and up halves (GGUFGateUp.expert); tokens and logits equal, bytes per device == plan."""
    from vramancer.devices.spec import parse_devices
    from vramancer.models.resolve import profile
    from vramancer.plan.experts import experts_on_host
    from vramancer.plan.planner import plan, plan_profile
    from vramancer.runtime.loader import load

    prof = profile(str(mixed))
    # whole layers do not fit, their attention does (+ a layer's gate and up experts dequantized: 6 bytes a value)
    devices = "rtx3090:193152B,rtx3060:193152B,cpu:8GiB"
    whole = plan(str(mixed), devices=devices, context=64, reserve_bytes=0, moe_experts_on_host=False, backing="cpu")
    assert whole.offloaded
    moe = experts_on_host(prof, parse_devices(devices, backing="cpu"), whole.workload, 0, whole, plan_profile)
    assert moe is not None and not moe.offloaded
    moved = [b for b in moe.blocks if b.experts_device]
    assert moved
    model = load(str(mixed), plan=moe)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, reference(PROMPT).logits)
    assert _greedy(model, PROMPT) == _greedy(reference, PROMPT)
    stats = model.vramancer.experts_hooks.stats
    assert stats.host_path_forwards == stats.forwards == len(moved) * (1 + NEW_TOKENS)
    rep = model.vramancer.memory_report()
    assert rep.weights_bytes_by_device() == moe.weights_bytes_by_device()
    assert [e.weights_bytes for e in rep.experts] == [b.experts_bytes for b in moved]
    # a 40-token prompt: its prefill copies each layer's stored experts (both halves' bytes) to the GPU
    long = torch.randint(4, 150, (1, 40), generator=torch.Generator().manual_seed(1))
    assert _greedy(model, long) == _greedy(reference, long)
    assert stats.copied_forwards == len(moved) and stats.copied_bytes == sum(b.experts_bytes for b in moved)
    assert model.vramancer.memory_report().weights_bytes_by_device() == moe.weights_bytes_by_device()
    model.vramancer.detach()


def test_expert_slice_equals_the_whole_weight(mixed):
    """GGUFGateUp.expert(stored, e) == the parametrized weight's expert e, for every expert."""
    from vramancer.runtime.loader import load

    model = load(str(mixed), devices="rtx3060", context=64, backing="cpu", dtype="float32")
    exp = model.get_submodule("model.layers.1.mlp.experts")
    par = exp.parametrizations.gate_up_proj
    with torch.no_grad():
        whole = exp.gate_up_proj
        for e in range(whole.shape[0]):
            assert torch.equal(par[0].expert(par.original, e), whole[e])
    model.vramancer.detach()
