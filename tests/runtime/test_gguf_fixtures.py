"""GGUF files made by llama.cpp's own tools (tests/fixtures/gguf: convert_hf_to_gguf.py and
llama-quantize, see its README) run through the split runtime and `vramancer run`:
F32 logits equal the float model's the file was converted from; every quantized file (Q8_0 from the
converter, legacy and K-quants from llama-quantize) gives the logits and greedy tokens of the float
model made by dequantizing the file with gguf-py's numpy reference; measured bytes per stage equal the
plan's and the file's; tokenizer and chat template come from the metadata; an architecture or a tensor
type we do not run is one line, exit 2."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from vramancer.cli import main as cli  # noqa: E402

from .gguf_reference import check_gguf_bytes, dequantize_into  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gguf"
RECORD = json.loads((FIXTURES / "sources.json").read_text())
_spec = importlib.util.spec_from_file_location("gguf_fixtures_make", FIXTURES / "make.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "mixtral"]
# (source, file kind) of every quantized fixture we run
QUANTIZED = ([(a, "Q8_0") for a in ARCHS] + [("llama", k) for k in ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1")]
             + [("llama256", k) for k in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K")])
PROMPT = torch.tensor([[1, 17, 40, 99, 150, 7]])
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def sources():
    """The float models, rebuilt, each checked to be the one its files were converted from."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            model = make.source_model(name)
            assert make.weights_sha256(model) == RECORD["sources"][name]["weights_sha256"], \
                f"make.source_model({name!r}) no longer rebuilds the fixtures' model: regenerate them (README)"
            cache[name] = model
        return cache[name]

    return get


def _path(name: str, kind: str) -> Path:
    return make.fixture(name, kind)


def _load(path: Path, n_stages: int = 2):
    from vramancer.runtime.loader import load

    return load(str(path), devices=",".join(["rtx3060"] * n_stages), split=[1] * n_stages, context=64,
                backing="cpu", dtype="float32")


def _dequantized(source, path: Path):
    """``source`` as the float model the file stands for, made without our code (gguf_reference)."""
    import copy

    return dequantize_into(copy.deepcopy(source), path)


def _greedy(model, ids) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_fixtures_are_llama_cpp_files():
    """Every fixture the record lists is here, made by the recorded commands, under 3 MB in all; the
    quantized ones hold the block types their names say."""
    files = [f for s in RECORD["sources"].values() for f in s["files"]]
    assert sorted(files) == sorted(p.name for p in FIXTURES.glob("*.gguf"))
    assert sum((FIXTURES / f).stat().st_size for f in files) < 3_000_000
    assert len(RECORD["llama.cpp"]) == 40
    types = {str(t.name): t.tensor_type.name for t in gguf.GGUFReader(str(_path("llama256", "Q4_K_M"))).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and "Q6_K" in types.values()
    for kind, want in (("Q5_K_M", "Q5_K"), ("Q6_K", "Q6_K"), ("Q3_K_M", "Q3_K"), ("Q2_K", "Q2_K")):
        types = {t.tensor_type.name for t in gguf.GGUFReader(str(_path("llama256", kind))).tensors}
        assert want in types, (kind, types)
    for kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL"):
        types = {str(t.name): t.tensor_type.name for t in gguf.GGUFReader(str(_path("llama", kind))).tensors}
        assert types["blk.0.ffn_up.weight"] == kind


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_equal_the_float_model(sources, arch):
    path = _path(arch, "F32")
    model = _load(path)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, sources(arch)(PROMPT).logits)
    check_gguf_bytes(model, path)
    model.vramancer.detach()


@pytest.mark.parametrize("name, kind", QUANTIZED, ids=[f"{n}-{k}" for n, k in QUANTIZED])
def test_quantized_equals_the_dequantized_float_model(sources, name, kind):
    path = _path(name, kind)
    ref = _dequantized(sources(name), path)
    model = _load(path, 1 if name == "llama256" else 2)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref(PROMPT).logits)
    assert _greedy(model, PROMPT) == _greedy(ref, PROMPT)
    check_gguf_bytes(model, path)
    model.vramancer.detach()


@pytest.mark.parametrize("arch", ARCHS)
def test_vramancer_run_with_the_files_tokenizer_and_chat_template(sources, capsys, arch):
    from vramancer.runtime.gguf.load import load_gguf_tokenizer

    path = _path(arch, "Q8_0")
    rc = cli(["run", str(path), "--prompt", "A model that does not fit", "--chat", "--max-new-tokens", "6",
              "--devices", "rtx3060,rtx3060", "--split", "1,1", "--context", "64", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    gen = json.loads(captured.out)["generation"]
    tok = load_gguf_tokenizer(path)
    assert tok.chat_template == make.CHAT_TEMPLATE
    ids = tok.apply_chat_template([{"role": "user", "content": "A model that does not fit"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert gen["prompt_tokens"] == len(ids)
    ref = _dequantized(sources(arch), path)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    want = out[0, len(ids):].tolist()
    assert gen["token_ids"] == want


@pytest.mark.parametrize("file, named", [("olmo-Q8_0.gguf", "olmo"), ("llama-IQ4_NL.gguf", "IQ4_NL")])
def test_what_we_do_not_run_is_one_line_exit_2(capsys, file, named):
    rc = cli(["run", str(FIXTURES / file), "--prompt", "x", "--max-new-tokens", "2", "--devices", "rtx3060"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("vramancer: error:")]
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("name,kind", [("llama", "F32"), ("llama", "Q8_0")])
def test_kv_cache_is_the_planned_float16(name, kind):
    """A GGUF profile budgets llama.cpp's float16 KV cache; on the CPU the blocks compute in float32,
    and generate keeps the cache in float16 all the same: measured KV bytes per stage == planned."""
    from vramancer.runtime.generate import generate_ids

    model = _load(_path(name, kind))
    rt = model.vramancer
    assert rt.kv_dtype == "float16" and rt.plan.workload.kv_dtype is None
    generate_ids(model, {"input_ids": torch.tensor([[1, 5, 9, 17]])}, 3, pad_token_id=0)
    rep = rt.memory_report()
    per_token = [sum(rt.plan.blocks[b].kv_bytes_per_token for b in range(*s.blocks))
                 for s in rt.plan.stages]
    assert rep.kv_tokens > 0
    assert [s.kv_cache_bytes for s in rep.stages] == [n * rep.kv_tokens for n in per_token]
    assert all(n > 0 for n in per_token)
    rt.detach()


# llama.cpp's Mixtral files with the routed experts of every layer in host RAM (``--n-cpu-moe``): one
# GPU too small for the whole layers, big enough for their attention and one layer's prefill copy
# each GPU also keeps room for a layer's gate and up experts dequantized (F32: cast to bfloat16, 2 bytes a
# value; Q8_0: float32 + bfloat16, 6): a prefill runs the host's experts on the GPU
MOE_DEVICES = {"F32": "rtx3090:200384B,rtx3060:200384B,cpu:8GiB", "Q8_0": "rtx3060:145152B,cpu:8GiB"}


@pytest.mark.parametrize("kind", sorted(MOE_DEVICES))
def test_mixtral_gguf_experts_in_host_ram(sources, kind):
    """The planner's experts placement of a llama.cpp Mixtral file (its profile names the stacked
    ``blk.N.ffn_*_exps`` tensors, the plan the model's experts modules): loaded with the experts' GGUF
    blocks on the host, run there by the host path (the selected experts dequantized), greedy tokens
    and logits equal the unsplit float model's (F32: the source; Q8_0: gguf-py's dequantization),
    measured bytes per device equal the plan's."""
    from vramancer.devices.spec import parse_devices
    from vramancer.models.resolve import profile
    from vramancer.plan.experts import experts_on_host
    from vramancer.plan.planner import plan, plan_profile
    from vramancer.runtime.loader import load

    path = _path("mixtral", kind)
    devices = MOE_DEVICES[kind]
    whole = plan(str(path), devices=devices, context=64, reserve_bytes=0, moe_experts_on_host=False, backing="cpu")
    assert whole.offloaded
    moe = experts_on_host(profile(str(path)), parse_devices(devices, backing="cpu"), whole.workload, 0, whole,
                          plan_profile)
    assert moe is not None and not moe.offloaded
    moved = [b for b in moe.blocks if b.experts_device]
    assert [b.experts_module for b in moved] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    file_bytes = {str(t.name): int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    for i, b in enumerate(moved):
        assert b.experts_bytes == sum(file_bytes[f"blk.{i}.ffn_{w}_exps.weight"] for w in ("gate", "up", "down"))
    ref = sources("mixtral") if kind == "F32" else _dequantized(sources("mixtral"), path)
    model = load(str(path), plan=moe)
    rt = model.vramancer
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, ref(PROMPT).logits)
        assert _greedy(model, PROMPT) == _greedy(ref, PROMPT)
    stats = rt.experts_hooks.stats
    assert stats.forwards == len(moved) * (1 + NEW_TOKENS) and stats.copied_forwards == 0   # forward + generate
    assert stats.host_path_forwards == stats.forwards
    rep = rt.memory_report()
    assert rep.weights_bytes_by_device() == moe.weights_bytes_by_device()
    assert [e.weights_bytes for e in rep.experts] == [b.experts_bytes for b in moved]
    assert all(e.torch_device == "cpu" and not e.misplaced for e in rep.experts)
    assert sum(rep.weights_bytes_by_device().values()) == sum(file_bytes.values())
    rt.detach()


@pytest.mark.parametrize("name, kind", [("llama", "Q8_0"), ("llama", "F16"), ("mixtral", "Q8_0"),
                                        ("llama256", "Q4_K_M")])
def test_planned_dequant_room_and_the_scratch_measured(name, kind):
    """The plan keeps room for each block's largest weight dequantized (6 bytes a value for GGUF blocks:
    float32 + the compute dtype's cast; 4 for F16; the gate and up experts read as one tensor; the LM
    head), and a CPU run in float32 dequantizes into a scratch of exactly 4 bytes x the largest value
    count of the weights it dequantizes whole (a MoE layer on the host dequantizes only its selected
    experts, runtime/experts.py: the plan's room for the whole stacked experts is a GPU prefill's)."""
    from vramancer.models.gguf_file import profile_from_gguf, read_gguf
    from vramancer.plan.planner import plan
    from vramancer.runtime.gguf.modules import GGUFWeight
    from vramancer.runtime.loader import load

    path = _path(name, kind)
    prof = profile_from_gguf(path)
    _, tensors = read_gguf(path)
    per_value = {"F16": 4, "BF16": 4, "F32": 2}
    want = [0] * len(prof.blocks)
    largest = 0          # values of the largest weight a layer dequantizes whole
    stacked: dict[int, int] = {}
    for t in tensors:
        if len(t.shape) < 2 or t.name == "token_embd.weight" and not prof.config.get("tie_word_embeddings"):
            continue
        numel = int(torch.tensor(t.shape).prod())
        i = len(prof.blocks) - 1 if not t.name.startswith("blk.") else int(t.name.split(".")[1]) + 1
        if "_exps." in t.name and ("gate" in t.name or "up" in t.name):
            stacked[i] = stacked.get(i, 0) + numel
            numel = stacked[i]
        want[i] = max(want[i], numel * per_value.get(t.dtype, 6))
        if t.dtype != "F32" and "_exps." not in t.name:   # experts on the host: their selected rows only
            largest = max(largest, numel)
    assert [b.dequant_bytes for b in prof.blocks] == want
    p = plan(str(path), devices="cpu:8GiB", context=64, reserve_bytes=0)
    acts = [st.activation_bytes for st in p.stages]
    model = load(str(path), plan=p)
    with torch.no_grad():
        model(PROMPT)
    scratches = {id(m.scratch): m.scratch for m in model.modules() if isinstance(m, GGUFWeight) and m.scratch}
    assert len(scratches) == 1
    assert next(iter(scratches.values())).nbytes == 4 * largest
    assert max(acts) >= max(want)           # the stage holding the largest block keeps its room
