"""GGUF files run split with their weights kept quantized: logits of an F32 file equal the
safetensors model's; a quantized file gives the same logits and greedy tokens as the float model
transformers makes by dequantizing the file (gguf-py's numpy reference); measured bytes per stage
equal the plan's; split equals unsplit; streamed stages and tied embeddings work."""
from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import offload_plan

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from vramancer.errors import BadInputError, CheckpointMismatchError  # noqa: E402
from vramancer.runtime.demo_model import build_demo_tokenizer  # noqa: E402
from vramancer.runtime.gguf.load import load_gguf_tokenizer  # noqa: E402
from vramancer.runtime.gguf.write import write_gguf  # noqa: E402

from .gguf_reference import check_gguf_bytes, dequantize_into  # noqa: E402

ARCHS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
         "phi3": "Phi3Config", "gemma2": "Gemma2Config"}
# transformers reads no head_dim for qwen3 from a GGUF (Qwen3Config's default, 128, stands): size to match
HIDDEN = {"qwen3": 512}
EXTRA = {"gemma2": dict(head_dim=16)}      # llama.cpp keeps Gemma2's norms as 1 + w; transformers undoes it
NEW_TOKENS = 8


def _model(arch: str, tok, hidden: int = 64, inter: int = 128, tie: bool | None = None, seed: int = 0):
    cfg = getattr(transformers, ARCHS[arch])(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=arch == "gemma2" if tie is None else tie,       # llama.cpp's Gemma2 has no output.weight
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        **EXTRA.get(arch, {}))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # a wide spread: greedy choices are decisive
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            elif p.dim() == 1 and arch in ("qwen2", "qwen3"):
                p.normal_(0.0, 0.5)   # q/k/v biases, q/k norms and norms non-trivial
    return model


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok) -> dict[str, dict[str, Path]]:
    """Per architecture: the safetensors folder and GGUF files of one model (F32, Q8_0, Q4_K mix)."""
    out: dict[str, dict[str, Path]] = {}
    root = tmp_path_factory.mktemp("gguf")
    for arch in ARCHS:
        model = _model(arch, tok, hidden=HIDDEN.get(arch, 64))
        d = root / arch
        model.save_pretrained(d / "hf", safe_serialization=True)
        tok.save_pretrained(d / "hf")
        out[arch] = {"hf": d / "hf"}
        for q in ("F32", "Q8_0"):
            out[arch][q] = write_gguf(model, d / f"{arch}-{q}.gguf", q, tokenizer=tok,
                                      name=arch).path  # transformers reads "mistral" by name
    big = _model("llama", tok, hidden=256, inter=512, seed=1)
    out["llama"]["Q4_K"] = write_gguf(big, root / "llama-Q4_K.gguf", "Q4_K", tokenizer=tok, fallback="Q6_K").path
    out["llama"]["tied"] = write_gguf(_model("llama", tok, tie=True, seed=2), root / "llama-tied-Q8_0.gguf", "Q8_0",
                                      tokenizer=tok).path
    return out


def _prompt(n: int = 6) -> torch.Tensor:
    return torch.tensor([[1, 17, 40, 99, 250, 7][:n]])


def _greedy(model, ids) -> list[int]:
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    return out[0, ids.shape[1]:].tolist()


def _reference(path: Path):
    """The float model transformers loads from the GGUF file (dequantized with gguf-py's numpy)."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def _dequantized_reference(hf_folder: Path, path: Path):
    """The safetensors model with every weight replaced by gguf-py's numpy dequantization of the
    file's tensor, put through transformers' tensor processor of the architecture (Llama's q/k
    un-permutation, Gemma2's norms - 1): the float model the quantized file stands for, made
    without our code (transformers' own GGUF load refuses Mistral)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    return dequantize_into(model, path)


def _load(path: Path, n_stages: int = 2, **kw):
    devices = ",".join(["rtx3060"] * n_stages)
    from vramancer.runtime.loader import load

    return load(str(path), devices=devices, split=[1] * n_stages, context=64, backing="cpu", **kw)


def _file_bytes(path: Path) -> dict[str, int]:
    return {str(t.name): int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_f32_file_logits_equal_safetensors(files, arch):
    ref = transformers.AutoModelForCausalLM.from_pretrained(files[arch]["hf"], dtype=torch.float32).eval()
    model = _load(files[arch]["F32"])
    assert model.config.model_type == arch
    ids = _prompt()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    check_gguf_bytes(model, files[arch]["F32"])
    model.vramancer.detach()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_q8_0_kept_quantized_equals_dequantized_float_model(files, arch):
    path = files[arch]["Q8_0"]
    ref = _dequantized_reference(files[arch]["hf"], path)
    model = _load(path)
    o_proj = model.get_submodule("model.layers.1.self_attn.o_proj")
    stored = o_proj.parametrizations.weight.original
    h = model.config.hidden_size
    assert stored.dtype == torch.uint8 and stored.shape == (h, h // 32 * 34)
    ids = _prompt()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert _greedy(model, ids) == _greedy(ref, ids)
    check_gguf_bytes(model, path)
    model.vramancer.detach()


def test_k_quant_file(files):
    """Q4_K matrices (Q6_K where rows are not whole 256-blocks): same logits as transformers'
    dequantized model, bytes as planned."""
    path = files["llama"]["Q4_K"]
    types = {str(t.name): t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q4_K"
    ref = _reference(path)
    model = _load(path)
    ids = _prompt()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    check_gguf_bytes(model, path)
    model.vramancer.detach()


def test_split_equals_unsplit(files):
    path = files["llama"]["Q8_0"]
    ids = _prompt()
    one = _load(path, 1)
    two = _load(path, 2)
    assert len(one.vramancer.stages) == 1 and len(two.vramancer.stages) == 2
    with torch.no_grad():
        assert torch.equal(one(ids).logits, two(ids).logits)
    assert _greedy(one, ids) == _greedy(two, ids)


def test_tied_embeddings_one_table_per_stage(files):
    path = files["llama"]["tied"]
    assert "output.weight" not in _file_bytes(path)
    ids = _prompt()
    ref = _reference(path)
    one = _load(path, 1)
    assert one.lm_head.parametrizations.weight.original is one.model.embed_tokens.weight
    two = _load(path, 2)
    assert two.lm_head.parametrizations.weight.original is not two.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(one(ids).logits, ref(ids).logits)
        assert torch.equal(two(ids).logits, ref(ids).logits)
    check_gguf_bytes(one, path)
    check_gguf_bytes(two, path)


def test_streamed_and_disk_stages(files, tmp_path):
    """Blocks on a GPU, in host RAM streamed to it, and on disk streamed to it: the GGUF blocks are
    what streams; tokens equal the unsplit run."""
    path = files["llama"]["Q8_0"]
    ids = _prompt()
    want = _greedy(_reference(path), ids)
    plan = offload_plan(str(path), context=64)
    from vramancer.runtime.loader import load

    model = load(str(path), plan=plan, offload_dir=str(tmp_path))
    assert [s.mode for s in model.vramancer.stages] == ["execute", "stream", "stream"]
    assert _greedy(model, ids) == want
    model.vramancer.detach()


def test_vramancer_load_dispatches_gguf_and_tokenizer(files, tok):
    import vramancer
    from vramancer.runtime.generate import generate_text

    path = files["llama"]["Q8_0"]
    model = vramancer.load(str(path), devices="rtx3060,rtx3060", split=[1, 1], context=64, backing="cpu")
    assert any("GGUF llama" in n for n in model.vramancer.notes)
    gtok = load_gguf_tokenizer(path)
    text = "A model that does not fit one card"
    assert gtok(text)["input_ids"] == tok(text)["input_ids"]
    assert gtok.chat_template == tok.chat_template
    res = generate_text(model, gtok, [{"role": "user", "content": "hello"}], max_new_tokens=4, min_new_tokens=4)
    assert res.new_tokens == 4 and res.prompt_tokens == len(gtok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=True)["input_ids"])
    model.vramancer.detach()


def test_unsupported_quant_type_named(tmp_path, tok):
    import numpy as np

    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 18), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from vramancer.runtime.gguf.load import open_gguf

    with pytest.raises(BadInputError, match="IQ4_NL") as e:
        open_gguf(path)
    assert e.value.exit_code == 2


def test_unsupported_architecture_named(tmp_path):
    from vramancer.runtime.gguf.load import gguf_model_config

    path = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BadInputError, match="rwkv6") as e:
        gguf_model_config(path)
    assert e.value.exit_code == 2


def _rewrite(src_path: Path, path: Path, change=lambda name, data: data, extra: dict | None = None) -> Path:
    """A copy of a GGUF file (metadata and tensors) with ``change(name, data)`` applied to each
    tensor and ``extra`` tensors added."""
    import numpy as np

    src = gguf.GGUFReader(str(src_path))
    w = gguf.GGUFWriter(str(path), str(src.fields["general.architecture"].contents()))
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val = field.contents()
        if isinstance(val, list):
            w.add_array(key, val)
        elif isinstance(val, str):
            w.add_string(key, val)
        elif isinstance(val, float):
            w.add_float32(key, val)
        else:
            w.add_uint32(key, int(val))
    for t in src.tensors:
        data = change(str(t.name), np.array(t.data))
        w.add_tensor(str(t.name), data, raw_dtype=t.tensor_type if data.dtype == np.uint8 else None)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_file_that_does_not_match_its_config(files, tmp_path):
    """A tensor of the wrong shape for the architecture: one line naming it."""
    path = _rewrite(files["llama"]["F32"], tmp_path / "bad.gguf",
                    lambda name, data: data[:64] if name == "blk.0.ffn_up.weight" else data)
    with pytest.raises((CheckpointMismatchError, BadInputError), match="ffn_up"):
        _load(path)


def test_tensors_the_model_has_no_place_for_are_left_unread(files, tmp_path, caplog):
    """llama.cpp writes extras such as ``rope_freqs.weight`` that transformers does not load: left
    unread (a warning names them), the model the same."""
    import logging

    import numpy as np

    path = _rewrite(files["llama"]["Q8_0"], tmp_path / "extra.gguf",
                    extra={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    ids = _prompt()
    with caplog.at_level(logging.WARNING, logger="vramancer.gguf"):
        model = _load(path)
    assert "rope_freqs.weight" in caplog.text
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _load(files["llama"]["Q8_0"])(ids).logits)


def test_plan_for_other_dtype_or_model_refused(files):
    """The runtime keeps the file's blocks: a plan sizing them as bfloat16 (made with --dtype), or
    made for another model, is refused in one line before anything loads."""
    from vramancer.plan.planner import plan as make_plan
    from vramancer.runtime.loader import load

    path = files["llama"]["Q8_0"]
    bf16 = make_plan(str(path), devices="rtx3060", context=64, backing="cpu", dtype="bfloat16")
    with pytest.raises(BadInputError, match="without --dtype") as e:
        load(str(path), plan=bf16)
    assert e.value.exit_code == 2
    other = make_plan(str(files["qwen2"]["Q8_0"]), devices="rtx3060", context=64, backing="cpu")
    with pytest.raises(BadInputError, match="plan"):
        load(str(path), plan=other)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_blocks_on_the_gpu(files):
    """On a real GPU the blocks live in VRAM and are dequantized there: float32 compute gives the
    CPU run's greedy tokens, bytes as planned; bfloat16 compute (the GPU default) runs too."""
    from vramancer.runtime.loader import load

    path = files["llama"]["Q8_0"]
    ids = _prompt()
    want = _greedy(_load(path, 1), ids)
    model = load(str(path), devices="cuda:0", context=64, dtype="float32")
    stored = model.get_submodule("model.layers.0.self_attn.o_proj").parametrizations.weight.original
    assert stored.device.type == "cuda" and stored.dtype == torch.uint8
    assert _greedy(model, ids.cuda()) == want
    check_gguf_bytes(model, path)
    model.vramancer.detach()
    half = load(str(path), devices="cuda:0", context=64)
    assert half.get_submodule("model.layers.0.self_attn.o_proj").weight.dtype == torch.bfloat16
    assert len(_greedy(half, ids.cuda())) == NEW_TOKENS


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q5_K", "Q6_K"])
def test_every_written_type_kept_as_stored(tmp_path, tok, qtype):
    """Each type the writer makes stays in the file's bytes on its stage (F16 / BF16 as such, cast
    when read; the quantized ones as blocks): logits equal the dequantized float model's."""
    model = _model("llama", tok, hidden=256, inter=512, seed=3)
    hf = tmp_path / "hf"
    model.save_pretrained(hf, safe_serialization=True)
    path = write_gguf(model, tmp_path / f"m-{qtype}.gguf", qtype, tokenizer=tok).path
    loaded = _load(path)
    stored = loaded.get_submodule("model.layers.0.mlp.down_proj").parametrizations.weight.original
    want_dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(qtype, torch.uint8)
    assert stored.dtype == want_dtype
    ids = _prompt()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, _dequantized_reference(hf, path)(ids).logits)
    check_gguf_bytes(loaded, path)
    loaded.vramancer.detach()
