"""Pre-quantized Hugging Face checkpoints (runtime/quant/prequantized.py, models/prequant.py): tiny
models quantized by transformers + bitsandbytes on the CPU and saved (4-bit NF4, 4-bit FP4 with
double quantization, 8-bit), loaded split over simulated GPUs weight by weight as stored. Greedy
tokens equal transformers' own loading of the same folder, and the weight bytes per stage measured
after generating equal the plan's. GPTQ / AWQ without their kernels: one line naming what is
missing."""
from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

PROMPT = [1, 5, 9, 17, 33, 40]
KINDS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


def _float_llama(seed: int = 0):
    """Layers at least one bitsandbytes block (64) wide."""
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prequant")
    src = root / "float"
    _float_llama().save_pretrained(src, safe_serialization=True)
    out = {"float": src}
    for kind, kw in KINDS.items():
        qm = transformers.AutoModelForCausalLM.from_pretrained(
            src, quantization_config=transformers.BitsAndBytesConfig(**kw), device_map="cpu")
        qm.save_pretrained(root / kind, safe_serialization=True)
        out[kind] = root / kind
    return out


def _greedy(model, n=8):
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("kind", list(KINDS))
def test_split_load_equals_transformers_and_plan(folders, kind):
    import bitsandbytes as bnb

    from vramancer.plan.planner import plan
    from vramancer.runtime.loader import load

    folder = folders[kind]
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    for m in ref.modules():   # bitsandbytes' CPU repack (absmax to bf16) is off in ours: off here too
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    want = _greedy(ref)
    p = plan(str(folder), devices="rtx3090,rtx3060,rtx4090", split=[1, 1, 1], context=16)
    assert p.workload.dtype == ("int8" if kind == "int8" else "nf4")
    model = load(str(folder), plan=p)
    layer = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    assert len([m for m in model.modules() if isinstance(m, layer)]) == 7 * 4
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert _greedy(model) == want
    rep = model.vramancer.memory_report()       # after generating: bitsandbytes moved nothing out of count
    assert [r.weights_bytes for r in rep.stages] == [s.weights_bytes for s in p.stages]
    assert not any(r.misplaced for r in rep.stages)
    if kind == "fp4-double":
        qs = model.model.layers[0].mlp.down_proj.weight.quant_state
        assert qs.nested and qs.quant_type == "fp4" and qs.absmax.dtype == torch.uint8
    model.vramancer.detach()


def test_held_bytes_leave_out_the_json_blobs(folders):
    """The plan counts what loading keeps: packed data + absmax + quant_map per 4-bit weight, not
    its JSON quant_state blob (parsed, then dropped)."""
    from vramancer.models.resolve import profile

    prof = profile(str(folders["nf4"]))
    w = 64 * 64   # q_proj: 4096 weights -> 2048 packed bytes + 64 fp32 absmax + 16 fp32 code entries
    names = [t for t in prof.blocks[1].modules]
    assert names
    from vramancer.models.dtypes import resolve_dtype

    assert resolve_dtype("nf4").weight_bytes((64, 64)) == w // 2 + 4 * (w // 64) + 64
    float_prof = profile(str(folders["float"]))
    # one layer: 7 quantized matrices + 2 fp32 norm vectors, as the on-load formula sizes them
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    want = sum(resolve_dtype("nf4").weight_bytes(s) for s in shapes) + 2 * 64 * 4
    assert prof.blocks[1].weights_bytes == want
    assert float_prof.blocks[1].weights_bytes == sum(a * b for a, b in shapes) * 4 + 2 * 64 * 4


def _with_method(folders, tmp_path, qc: dict):
    folder = tmp_path / qc["quant_method"]
    shutil.copytree(folders["float"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128},
     r"a checkpoint quantized with 'gptq' needs its kernels on cuda devices; this plan runs stages on cpu"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm"},
     r"a checkpoint quantized with 'awq' needs its kernels on cuda devices"),
    ({"quant_method": "hqq", "nbits": 4}, r"hqq is not supported"),
])
def test_missing_kernels_are_one_line(folders, tmp_path, qc, message):
    from vramancer.errors import WorkloadError
    from vramancer.plan.planner import plan
    from vramancer.runtime.loader import load

    folder = _with_method(folders, tmp_path, qc)
    p = plan(str(folder), devices="rtx3090,rtx3060", split=[1, 1], context=16)
    with pytest.raises(WorkloadError, match=message):
        load(str(folder), plan=p)


def test_missing_package_is_named(folders, tmp_path, monkeypatch):
    from vramancer.errors import WorkloadError
    from vramancer.runtime.quant import prequantized

    monkeypatch.setitem(prequantized.KERNEL_PACKAGES, "gptq", (("gptqmodel", "auto_gptq"), ("cpu", "cuda")))
    monkeypatch.setattr(prequantized.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WorkloadError, match=r"needs the gptqmodel or auto-gptq package: pip install gptqmodel"):
        prequantized.check_prequantized("gptq", {"cpu"})


def test_cli_run_refuses_gptq_in_one_line(folders, tmp_path, capsys):
    from vramancer.cli import main as cli
    from vramancer.runtime.demo_model import build_demo_tokenizer

    folder = _with_method(folders, tmp_path, {"quant_method": "gptq", "bits": 4})
    build_demo_tokenizer().save_pretrained(folder)   # refused at the load, before any token
    rc = cli(["run", str(folder), "--prompt", "hi", "--devices", "rtx3090,rtx3060", "--split", "1,1",
              "--context", "16", "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "quantized with 'gptq' needs its kernels on cuda" in err


@pytest.mark.parametrize("backend", ["torchao", "bitsandbytes"])
def test_quant_backend_on_a_prequantized_checkpoint(folders, backend):
    """bitsandbytes blocks load as stored: --quant-backend torchao is refused in one line, not ignored;
    naming the checkpoint's own package is accepted."""
    from vramancer.errors import WorkloadError
    from vramancer.plan.planner import plan
    from vramancer.runtime.loader import load

    p = plan(str(folders["nf4"]), devices="cpu:4GiB", context=16)
    if backend == "torchao":
        with pytest.raises(WorkloadError, match=r"--quant-backend torchao .* these weights load as their stored "
                                                r"bitsandbytes blocks: drop it"):
            load(str(folders["nf4"]), plan=p, quant_backend=backend)
    else:
        model = load(str(folders["nf4"]), plan=p, quant_backend=backend)
        assert len(_greedy(model, 2)) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", list(KINDS))
def test_prequantized_on_cuda_stages(folders, kind):
    """The same checkpoints split over simulated GPUs backed by cuda:0: bitsandbytes' CUDA kernels,
    greedy tokens as transformers' own CUDA load, bytes as planned."""
    from vramancer.plan.planner import plan
    from vramancer.runtime.loader import load

    folder = folders[kind]
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cuda:0")
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT]).cuda(), max_new_tokens=8, do_sample=False,
                            pad_token_id=0)[0, len(PROMPT):].tolist()
    del ref
    p = plan(str(folder), devices="rtx3090,rtx3060", split=[1, 1], context=16, backing="cuda:0")
    model = load(str(folder), plan=p)
    with torch.no_grad():
        got = model.generate(torch.tensor([PROMPT]).cuda(), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)[0, len(PROMPT):].tolist()
    assert got == want
    rep = model.vramancer.memory_report()
    assert [r.weights_bytes for r in rep.stages] == [s.weights_bytes for s in p.stages]
    model.vramancer.free()
