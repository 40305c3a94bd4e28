"""Quantize on load (runtime/quant/): a float checkpoint loaded as bitsandbytes NF4 / FP4 (int4) /
int8 weights or torchao int8 weights,
split over simulated GPUs backed by the CPU. The planner's weight bytes per stage equal the measured
ones (packed data + scales + code tables), and the split model's greedy tokens equal the unsplit
quantized model's."""
from __future__ import annotations

import pytest

from .conftest import build_model, make_plan

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

ARCHS = ["llama", "qwen2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-models")
    out = {}
    for arch in ARCHS:
        folder = root / arch
        build_model(arch).save_pretrained(folder, safe_serialization=True)
        out[arch] = folder
    return out


def _load(folder, n_stages, dtype, backend=None):
    from vramancer.runtime.loader import load

    plan = make_plan(folder, n_stages, dtype=dtype, devices="rtx3090" if n_stages == 1 else None)
    assert plan.workload.dtype == dtype
    return load(str(folder), plan=plan, quant_backend=backend)


def _greedy(model, n=8):
    ids = torch.tensor([[1, 5, 9, 17, 33, 40]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("dtype", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("arch", ARCHS)
def test_planned_bytes_equal_measured(folders, arch, dtype):
    import bitsandbytes as bnb

    model = _load(folders[arch], 2, dtype)
    plan = model.vramancer.plan
    rep = model.vramancer.memory_report()
    assert [s.weights_bytes for s in rep.stages] == [s.weights_bytes for s in plan.stages]
    _greedy(model, 2)   # after forwards too (bitsandbytes moves LLM.int8's row scales into its layer state)
    rep = model.vramancer.memory_report()
    assert [s.weights_bytes for s in rep.stages] == [s.weights_bytes for s in plan.stages]
    layer = bnb.nn.Linear8bitLt if dtype == "int8" else bnb.nn.Linear4bit
    quantized = [m for m in model.modules() if isinstance(m, layer)]
    assert len(quantized) == 7 * 4                      # q k v o gate up down in 4 layers
    assert type(model.lm_head) is torch.nn.Linear       # the head and the embeddings stay float
    assert model.lm_head.weight.dtype == torch.bfloat16
    w = quantized[0].weight
    assert w.dtype == (torch.int8 if dtype == "int8" else torch.uint8)
    if dtype != "int8":
        assert w.quant_state.quant_type == ("fp4" if dtype == "int4" else "nf4")
    model.vramancer.detach()


@pytest.mark.parametrize("arch", ARCHS)
def test_torchao_int8_planned_bytes_equal_measured(folders, arch):
    pytest.importorskip("torchao")
    model = _load(folders[arch], 2, "int8", backend="torchao")
    rep = model.vramancer.memory_report()
    assert [s.weights_bytes for s in rep.stages] == [s.weights_bytes for s in model.vramancer.plan.stages]
    w = model.model.layers[0].self_attn.q_proj.weight
    assert type(w).__name__ == "Int8Tensor" and w.qdata.dtype == torch.int8
    assert tuple(w.scale.shape) == (w.shape[0], 1) and w.scale.dtype == torch.float32
    assert type(model.lm_head.weight) is torch.nn.Parameter and model.lm_head.weight.dtype == torch.bfloat16
    # weight-only: bf16 activations times int8 rows dequantized (symmetric absmax per row), greedy
    # tokens as the bf16 model's (bitsandbytes' LLM.int8 also quantizes the activations)
    got = _greedy(model)
    model.vramancer.detach()
    bf16 = _load(folders[arch], 2, "bfloat16")
    assert got == _greedy(bf16)
    bf16.vramancer.detach()


def test_backend_choice_is_checked(folders):
    from vramancer.errors import WorkloadError
    from vramancer.runtime.quant import backend_for

    assert backend_for("int8", {"cpu"}).package == "bitsandbytes"
    assert backend_for("int4", {"cpu"}).package == "bitsandbytes"
    with pytest.raises(WorkloadError, match="not quantized through torchao"):
        backend_for("nf4", {"cpu"}, prefer="torchao")
    with pytest.raises(WorkloadError, match="known bitsandbytes, torchao"):
        backend_for("int8", {"cpu"}, prefer="quanto")
    with pytest.raises(WorkloadError, match="no kernel for mps devices"):
        backend_for("int4", {"cpu", "mps"})


@pytest.mark.parametrize("dtype", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("arch", ARCHS)
def test_split_greedy_equals_unsplit(folders, arch, dtype):
    one = _load(folders[arch], 1, dtype)
    want = _greedy(one)
    one.vramancer.detach()
    split = _load(folders[arch], 3, dtype)
    assert len(split.vramancer.plan.stages) == 3
    assert _greedy(split) == want
    split.vramancer.detach()


def test_nf4_weight_bytes_formula():
    from vramancer.models.dtypes import resolve_dtype

    # 48 x 32 = 1536 weights: 768 packed bytes + 24 fp32 absmax + 16 fp32 code entries
    assert resolve_dtype("nf4").weight_bytes((48, 32)) == 768 + 24 * 4 + 64
    # int8: one byte a weight + an fp32 scale per row
    assert resolve_dtype("int8").weight_bytes((48, 32)) == 1536 + 48 * 4


def test_gguf_dtype_on_load_is_refused_in_one_line(folders):
    from vramancer.errors import WorkloadError

    with pytest.raises(WorkloadError, match="cannot be quantized on load"):
        _load(folders["llama"], 2, "q4_0")


@pytest.mark.parametrize("dtype, match", [("q4_0", "cannot be quantized on load"),
                                          ("nf4", "every stage must stay resident")])
def test_a_streaming_plan_names_the_dtype_first(folders, dtype, match):
    """On a plan that streams a stage from disk, a --dtype no on-load quantizer has is named as such
    (fixing the devices would not help it); an on-load one is refused for the streaming."""
    from vramancer.errors import WorkloadError
    from vramancer.runtime.loader import load

    from .conftest import placed_plan

    plan = placed_plan(folders["llama"], "rtx3090,cpu,disk", "stream", dtype=dtype)
    assert any(st.mode == "stream" for st in plan.stages)
    with pytest.raises(WorkloadError, match=match):
        load(str(folders["llama"]), plan=plan)


def test_quant_backend_on_a_load_that_quantizes_nothing_is_refused(folders):
    """--quant-backend with a float dtype, or on a GGUF file, is refused in one line, not ignored."""
    from pathlib import Path

    from vramancer.errors import WorkloadError
    from vramancer.runtime.loader import load

    with pytest.raises(WorkloadError, match="--quant-backend torchao .* load as float32: drop it"):
        _load(folders["llama"], 1, "float32", backend="torchao")
    gguf = Path(__file__).parents[1] / "fixtures" / "gguf" / "llama-Q8_0.gguf"
    with pytest.raises(WorkloadError, match="load as their GGUF types: drop it"):
        load(str(gguf), devices="cpu:64GiB", quant_backend="bitsandbytes")
    with pytest.raises(WorkloadError, match="load as the module's own dtypes: drop it"):
        load(torch.nn.Linear(4, 4), devices="cpu:64GiB", quant_backend="torchao")


def test_cli_run_int8_through_torchao(tmp_path, capsys):
    """`vramancer run --dtype int8 --quant-backend torchao`: weight-only int8, bytes as planned."""
    import json

    pytest.importorskip("torchao")
    from tests.models.tiny import chat_llama
    from vramancer.cli import main as cli

    model, tok = chat_llama()
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    rc = cli(["run", str(tmp_path / "m"), "-p", "Hello", "-n", "4", "--devices", "rtx3090,rtx3060", "--split", "1,1",
              "--context", "32", "--dtype", "int8", "--quant-backend", "torchao", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["plan"]["workload"]["dtype"] == "int8"
    mem = out["memory"]["stages"]
    assert [s["weights_bytes"] for s in mem] == [s["planned_weights_bytes"] for s in mem]
    rc = cli(["run", str(tmp_path / "m"), "-p", "Hello", "--devices", "rtx3090", "--context", "32", "--dtype", "nf4",
              "--quant-backend", "torchao"])
    assert rc == 2 and "nf4 is not quantized through torchao" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["int8", "nf4"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_experts_and_router_stay_float_and_are_counted_so(tmp_path, arch, dtype):
    """transformers fuses routed experts into 3-D parameters and makes the router a plain parameter:
    the on-load quantizers (nn.Linear only) leave both at the compute dtype, and the plan counts them so."""
    from tests.models.tiny import config, random_model
    from vramancer.plan.planner import plan as make
    from vramancer.runtime.loader import load

    random_model(config(arch)).save_pretrained(tmp_path)
    plan = make(str(tmp_path), devices="rtx3090:1GiB,rtx3060:1GiB", dtype=dtype)
    model = load(str(tmp_path), plan=plan)
    _greedy(model, 2)
    rep = model.vramancer.memory_report()
    assert [s.weights_bytes for s in rep.stages] == [s.weights_bytes for s in plan.stages]
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert experts and all(p.dtype == torch.bfloat16 for m in experts for p in m.parameters())
