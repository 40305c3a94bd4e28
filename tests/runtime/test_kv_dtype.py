"""--kv-dtype (runtime/kvcache.py, models/layout.with_kv_dtype): the planner budgets the KV cache in
q8_0 / fp8 / bf16 bytes, the split runtime stores it so (measured bytes per stage == planned), and
reads it back at the compute dtype: a float32 "cache format" is transformers' own cache exactly,
bf16 keeps greedy output, q8_0 blocks are llama.cpp's."""
from __future__ import annotations

import json
import threading

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [1, 5, 9, 17, 33, 40]
NEW = 8
TOKENS = len(PROMPT) + NEW - 1   # the cache holds every token but the last generated one


def _tiny(arch: str, seed: int = 0):
    """A tiny Llama / Mistral (sliding window 5) with a head size of 32: whole q8_0 blocks."""
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, max_position_embeddings=128, pad_token_id=0)
    cfg = (transformers.MistralConfig(sliding_window=5, **kw) if arch == "mistral"
           else transformers.LlamaConfig(**kw))
    torch.manual_seed(seed)
    cls = transformers.MistralForCausalLM if arch == "mistral" else transformers.LlamaForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv-models")
    out = {}
    for arch in ("llama", "mistral"):
        _tiny(arch).save_pretrained(root / arch, safe_serialization=True)
        out[arch] = root / arch
    return out


def _plan(folder, kv, n_stages=2, context=TOKENS):
    from vramancer.plan.planner import plan

    devices = "rtx3090,rtx3060,rtx4090"[: 15 if n_stages == 2 else None]
    return plan(str(folder), devices=devices, split=[1] * n_stages, context=context, kv_dtype=kv)


def _run(folder, kv, n_stages=2):
    """(greedy new tokens, the model split per a plan with ``kv``, that plan)."""
    from vramancer.runtime.generate import generate_ids
    from vramancer.runtime.loader import load

    plan = _plan(folder, kv, n_stages)
    model = load(str(folder), plan=plan)
    out = generate_ids(model, {"input_ids": torch.tensor([PROMPT])}, NEW, pad_token_id=0)
    return out[0, len(PROMPT):].tolist(), model, plan


def _reference(folder) -> list[int]:
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


# ------------------------------------------------------------------------------------------------
def test_planner_budgets_kv_bytes_per_token(folders):
    """Per layer: K + V of 1 kv head x 32 values = 64 values a token: f32 256 B, bf16 128,
    fp8 64, q8_0 2 blocks x 34 = 68."""
    from vramancer.plan.plan import Plan

    want = {None: 256, "float32": 256, "bf16": 128, "fp8": 64, "q8_0": 68}
    for kv, per_layer in want.items():
        plan = _plan(folders["llama"], kv, context=100)
        assert [b.kv_bytes_per_token for b in plan.blocks] == [0] + [per_layer] * 4 + [0]
        assert sum(s.kv_cache_bytes for s in plan.stages) == 4 * per_layer * 100
        back = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
        assert back.workload.kv_dtype == (None if kv is None else {"bf16": "bfloat16"}.get(kv, kv))


def test_bad_kv_dtype_is_one_line(folders):
    from vramancer.errors import WorkloadError

    with pytest.raises(WorkloadError, match=r"--kv-dtype q4_0: the KV cache is stored as one of"):
        _plan(folders["llama"], "q4_0")
    # head size 8 is no whole q8_0 block (llama.cpp refuses it too)
    from .conftest import build_model

    small = build_model("llama")
    with pytest.raises(WorkloadError, match="q8_0 stores blocks of 32 values per head; .* head size is 8"):
        from vramancer.plan.planner import plan

        plan(small, devices="rtx3090,rtx3060", split=[1, 1], context=16, kv_dtype="q8_0")


def test_plan_json_refuses_unknown_kv_dtype(folders):
    from vramancer.errors import BadInputError
    from vramancer.plan.plan import Plan

    d = _plan(folders["llama"], "q8_0").to_dict()
    d["workload"]["kv_dtype"] = "int3"
    with pytest.raises(BadInputError, match="kv_dtype"):
        Plan.from_dict(d)


def test_q8_0_blocks_are_llama_cpps():
    """Our Q8_0 bytes equal gguf's reference quantizer's (fp16 d, then 32 int8) for random rows."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from vramancer.runtime.kvcache import dequantize_q8_0, quantize_q8_0

    x = torch.randn(3, 4, 5, 64) * torch.logspace(-3, 2, 5)[None, None, :, None]
    x[0, 0, 0, :32] = 0.0   # an all-zero block: d = 0, q = 0
    q, d = quantize_q8_0(x)
    ours = np.concatenate([d.numpy().reshape(-1, 1).view(np.uint8),
                           q.numpy().reshape(-1, 32).view(np.uint8)], axis=1).reshape(-1)
    ref = gguf.quants.quantize(x.numpy().reshape(-1, 64), gguf.GGMLQuantizationType.Q8_0).reshape(-1)
    assert ours.tobytes() == ref.tobytes()
    back = gguf.quants.dequantize(ref, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)
    assert torch.equal(dequantize_q8_0(q, d, torch.float32), torch.from_numpy(back.copy()))


def test_q8_0_round_trip_error_is_about_half_a_step():
    from vramancer.runtime.kvcache import dequantize_q8_0, quantize_q8_0

    x = torch.randn(2, 2, 7, 64)
    q, d = quantize_q8_0(x)
    assert q.dtype == torch.int8 and d.dtype == torch.float16 and tuple(d.shape) == (2, 2, 7, 2)
    err = (dequantize_q8_0(q, d, torch.float32) - x).abs().reshape(2, 2, 7, 2, 32)
    step = d.float().unsqueeze(-1)
    # half a step, plus 127 x the fp16 rounding of d (q is rounded with the exact d, as llama.cpp does)
    assert bool((err <= step * (0.5 + 127 / 2048) + 1e-7).all())
    assert float(err.mean()) < 0.3 * float(step.mean())


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_float32_format_is_transformers_cache_exactly(folders, arch):
    """The packed layers with a plain float32 "format" are the default cache, full and sliding:
    same greedy tokens, same bytes as the plan."""
    want = _reference(folders[arch])
    got, model, plan = _run(folders[arch], "float32")
    assert got == want
    rep = model.vramancer.memory_report()
    assert rep.kv_tokens == TOKENS
    cache_layers = model.vramancer._kv.layer_bytes
    assert len(cache_layers) == 4
    if arch == "llama":
        assert [r.kv_cache_bytes for r in rep.stages] == [s.kv_cache_bytes for s in plan.stages]
    else:   # a sliding layer keeps window - 1 = 4 tokens between steps
        assert [r.kv_cache_bytes for r in rep.stages] == [2 * 256 * 4] * 2
    model.vramancer.detach()


@pytest.mark.parametrize("kv,data_dtype", [("q8_0", torch.int8), ("fp8", torch.float8_e4m3fn),
                                           ("bf16", torch.bfloat16)])
def test_measured_kv_bytes_equal_planned(folders, kv, data_dtype):
    got, model, plan = _run(folders["llama"], kv, n_stages=3)
    rep = model.vramancer.memory_report()
    assert rep.kv_tokens == TOKENS
    assert [r.kv_cache_bytes for r in rep.stages] == [s.kv_cache_bytes for s in plan.stages]
    assert all(r.kv_cache_bytes > 0 for r in rep.stages)
    assert not any(r.over_plan for r in rep.stages)
    # what generate kept: packed data (and q8_0's fp16 scales) on each stage's device
    from vramancer.runtime.kvcache import kv_cache_for

    cache = kv_cache_for(model)
    assert type(cache.layers[0]).__name__ == "PackedKVLayer"
    with torch.no_grad():
        model(torch.tensor([PROMPT]), cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.keys.dtype == data_dtype and tuple(layer.keys.shape) == (1, 1, len(PROMPT), 32)
    assert (layer.key_scales is not None) == (kv == "q8_0")
    model.vramancer.detach()


def test_bf16_cache_keeps_greedy_output(folders):
    want = _reference(folders["llama"])
    got, model, _ = _run(folders["llama"], "bf16")
    assert got == want
    # logits within bf16's rounding of the float cache's
    from vramancer.runtime.kvcache import new_kv_cache

    ids = torch.tensor([PROMPT + want])
    with torch.no_grad():
        bf = model(ids, cache=new_kv_cache(model.config, "bf16"), use_cache=True).logits
        fl = model(ids, use_cache=True).logits
    torch.testing.assert_close(bf, fl, rtol=0, atol=0.05 * float(fl.abs().max()))
    model.vramancer.detach()


def test_sliding_q8_0_keeps_the_window(folders):
    """Sliding layers stay sliding when packed: window - 1 tokens of 68 bytes each per layer."""
    got, model, plan = _run(folders["mistral"], "q8_0")
    rep = model.vramancer.memory_report()
    assert [r.kv_cache_bytes for r in rep.stages] == [2 * 68 * 4] * 2
    assert [s.kv_cache_bytes for s in plan.stages] == [2 * 68 * 5] * 2   # the plan sizes the window
    assert len(got) == NEW
    model.vramancer.detach()


def test_cli_plan_and_run_with_kv_dtype(folders, capsys, tmp_path):
    from vramancer.cli import main as cli

    rc = cli(["plan", str(folders["llama"]), "--devices", "rtx3090,rtx3060", "--split", "1,1", "--context", "64",
              "--kv-dtype", "q8_0", "--json", "-o", str(tmp_path / "plan.json")])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["workload"]["kv_dtype"] == "q8_0"
    assert sum(s["kv_cache_bytes"] for s in out["stages"]) == 4 * 68 * 64
    assert out["exports"]["llama_cpp"].endswith("-c 64 -ctk q8_0 -ctv q8_0")   # llama.cpp's own KV flags
    rc = cli(["plan", str(folders["llama"]), "--kv-dtype", "int2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().count("\n") == 0 and "--kv-dtype int2" in err


@pytest.fixture(scope="module")
def chat_split(tmp_path_factory):
    """A tiny Llama with the demo's tokenizer, head size 32, saved as a folder."""
    from tests.models.tiny import chat_llama

    model, tok = chat_llama(hidden_size=128, intermediate_size=128, num_hidden_layers=2)
    folder = tmp_path_factory.mktemp("kv-chat") / "llama"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder, tok


@pytest.mark.parametrize("kv", ["q8_0", "fp8"])
def test_serve_engine_stores_the_planned_format(chat_split, kv):
    """The continuous-batching engine (serve/) keeps its batch cache packed: KV bytes per token as
    planned, a batch of padded rows gives each request what it gets alone, and alone what
    ``generate`` gives with the same cache format."""
    from vramancer.plan.planner import plan
    from vramancer.runtime.generate import generate_ids
    from vramancer.runtime.loader import load
    from vramancer.serve.engine import Engine
    from vramancer.serve.sampling import SamplingParams

    folder, tok = chat_split
    p = plan(str(folder), devices="rtx3090,rtx3060", split=[1, 1], context=64, batch=4, kv_dtype=kv)
    model = load(str(folder), plan=p)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ("Hello there", "The quick brown fox jumps over the lazy dog", "A", "VRAM is memory")]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    eng = Engine(model, tok, context_tokens=64, max_batch=4, prefill_chunk_tokens=8)
    try:
        assert eng.kv_bytes_per_token == sum(b.kv_bytes_per_token for b in p.blocks)
        assert [st.kv_bytes_per_token for st in eng.stages] == [68 * 2 if kv == "q8_0" else 64 * 2] * 2
        eng.start()

        def run(batch):
            done = [threading.Event() for _ in batch]
            seqs = [eng.submit(q, greedy, lambda e, ev=ev: ev.set() if e.kind == "finish" else None)
                    for q, ev in zip(batch, done)]
            assert all(ev.wait(60) for ev in done)
            return [s.output_ids for s in seqs]

        alone = [run([q])[0] for q in prompts]
        assert run(prompts) == alone
        assert eng.stats().peak_running == len(prompts)
    finally:
        eng.stop()
    for q, ids in zip(prompts[:2], alone[:2]):
        out = generate_ids(model, {"input_ids": torch.tensor([q])}, greedy.max_tokens, pad_token_id=0)
        assert out[0, len(q):].tolist() == ids
    model.vramancer.detach()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv", ["q8_0", "fp8", "bf16"])
def test_packed_cache_on_cuda_stages(folders, kv):
    """Simulated GPUs backed by cuda:0: the packed K/V (and scales) live on the GPU, bytes as planned."""
    from vramancer.plan.planner import plan
    from vramancer.runtime.generate import generate_ids
    from vramancer.runtime.loader import load

    p = plan(str(folders["llama"]), devices="rtx3090,rtx3060", split=[1, 1], context=TOKENS, kv_dtype=kv,
             backing="cuda:0")
    model = load(str(folders["llama"]), plan=p)
    out = generate_ids(model, {"input_ids": torch.tensor([PROMPT]).cuda()}, NEW, pad_token_id=0)
    assert out.shape[1] == len(PROMPT) + NEW
    rep = model.vramancer.memory_report()
    assert [r.kv_cache_bytes for r in rep.stages] == [s.kv_cache_bytes for s in p.stages]
    assert all(r.kv_devices == ["cuda:0"] for r in rep.stages)
    model.vramancer.free()
