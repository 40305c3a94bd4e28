"""``profile(model)``: each source it resolves (catalog, HF cache, nn.Module, meta-device fallback)
and the errors for what it cannot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vramancer
from vramancer.errors import BadInputError, UnknownModelError, WorkloadError
from vramancer.models.module import profile_from_meta
from vramancer.models.profile import ModelProfile
from vramancer.models.resolve import find_in_hf_cache, profile

from .tiny import cache_layer_bytes, random_model, torch, transformers

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_unknown_model_message() -> None:
    with pytest.raises(UnknownModelError) as e:
        profile("no-such-model-xyz")
    assert str(e.value) == ("unknown model 'no-such-model-xyz': not a local path, not in the HF cache, not in the "
                            "catalog (see `vramancer plan --list-models`)")
    with pytest.raises(UnknownModelError):
        profile("nobody/no-such-repo-xyz")


def test_bad_inputs() -> None:
    with pytest.raises(BadInputError, match="cannot profile a int"):
        profile(42)
    with pytest.raises(WorkloadError, match="unknown dtype"):
        profile("llama-3.1-8b", dtype="float7")


def test_unsupported_file(tmp_path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(UnknownModelError, match="unsupported model file"):
        profile(str(f))


def test_profile_passes_through() -> None:
    p = profile("llama-3.1-8b")
    assert profile(p) is p and profile(p, "bf16") is p
    q = profile(p, "float16")  # the same model in another dtype
    assert q.dtype == "float16" and q.weights_bytes == p.weights_bytes and q.name == p.name


def test_catalog_profile_without_torch() -> None:
    out = _run(
        "import sys, json, vramancer\n"
        "p = vramancer.profile('llama-3.1-8b')\n"
        "q = vramancer.profile('llama-3.1-8b', dtype='nf4')\n"
        "print(json.dumps([p.source, p.dtype, p.params, p.weights_bytes, q.weights_bytes, p.num_blocks,"
        " 'torch' in sys.modules, 'transformers' in sys.modules]))\n")
    source, dtype, params, wbytes, nf4, blocks, torch_loaded, tf_loaded = json.loads(out)
    assert (source, dtype, blocks) == ("catalog", "bfloat16", 34)
    assert params == 8_030_261_248 and wbytes == 2 * params  # Llama-3.1-8B's published count
    assert nf4 < wbytes * 0.4  # 4.5-bit layers; embeddings and LM head stay bf16 under bitsandbytes
    assert not torch_loaded and not tf_loaded


def test_catalog_diffusion_entry() -> None:
    p = profile("flux.1-dev")
    assert p.kind == "diffusion" and p.source == "catalog" and p.kv_bytes_per_token == 0


def _fake_hf_cache(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<rev>/...}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_hf_id_from_local_cache(tmp_path) -> None:
    cfg = transformers.AutoConfig.for_model("qwen2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                                            dtype="bfloat16")
    d = tmp_path / "src"
    random_model(cfg, "bfloat16").save_pretrained(d)
    cache = tmp_path / "hub"
    _fake_hf_cache(cache, "tiny-org/tiny-qwen", {"config.json": (d / "config.json").read_bytes(),
                                                 "model.safetensors": (d / "model.safetensors").read_bytes()})
    _fake_hf_cache(cache, "tiny-org/config-only", {"config.json": (d / "config.json").read_bytes()})
    assert find_in_hf_cache("tiny-org/tiny-qwen", cache_dir=cache) is not None
    assert find_in_hf_cache("tiny-org/absent", cache_dir=cache) is None
    expected = profile(str(d)).weights_bytes
    out = _run(
        "import json, vramancer\n"
        "p = vramancer.profile('tiny-org/tiny-qwen')\n"
        "c = vramancer.profile('tiny-org/config-only')\n"
        "print(json.dumps([p.source, p.weights_bytes, p.arch, c.source, c.weights_bytes]))\n",
        env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    source, wbytes, arch, csource, cbytes = json.loads(out)
    assert (source, wbytes, arch) == ("hf-cache", expected, "qwen2")
    assert csource == "hf-cache" and cbytes == expected


class TiedToy(torch.nn.Module):
    """A plain module: embedding, a ModuleList of blocks, a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                                              torch.nn.Linear(32, 16)) for _ in range(3))
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight


def test_plain_module_blocks_and_tied_weights() -> None:
    m = TiedToy()
    p = profile(m)
    assert p.source == "module" and p.dtype == "float32" and p.num_blocks == 5 and p.layers_prefix == "blocks"
    assert p.blocks[0].modules == ["embed"] and p.blocks[-1].modules == ["norm", "head"]
    assert p.blocks[0].shared == p.blocks[-1].shared == {"embed.weight": 50 * 16 * 4}
    layer = (16 * 32 + 32 + 32 * 16 + 16) * 4
    assert [b.weights_bytes for b in p.blocks] == [0, layer, layer, layer, 2 * 16 * 4]
    assert p.weights_bytes == sum(x.numel() * 4 for x in m.parameters())
    assert p.params == sum(x.numel() for x in m.parameters())
    half = profile(m.to(torch.bfloat16))
    assert half.dtype == "bfloat16" and half.weights_bytes * 2 == p.weights_bytes
    assert profile(m, dtype="float32").weights_bytes == p.weights_bytes


@pytest.mark.parametrize("arch,kw", [
    ("olmo2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, vocab_size=128)),
    ("starcoder2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=128, sliding_window=16)),
    ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                    multi_query=True, new_decoder_architecture=False)),
])
def test_meta_fallback_for_architectures_outside_the_table(arch: str, kw: dict) -> None:
    cfg = transformers.AutoConfig.for_model(arch, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    raw = {**cfg.to_dict(), "model_type": arch}
    p = profile_from_meta(raw, "float32")
    model = random_model(cfg)
    assert p.kind == "causal-lm" and any("meta device" in n for n in p.notes)
    assert p.weights_bytes == sum(x.numel() * 4 for x in model.parameters())
    assert p.num_blocks == kw["num_hidden_layers"] + 2
    covered = [n for n, _ in list(model.named_parameters()) + list(model.named_buffers())
               if not any(n == m or n.startswith(m + ".") for b in p.blocks for m in b.modules)]
    assert covered == []
    with torch.no_grad():
        out = model(input_ids=torch.randint(3, 128, (1, 6)), use_cache=True)
    assert cache_layer_bytes(out) == [b.kv_bytes(6, 1) for b in p.blocks[1:-1]]


def test_meta_fallback_encoder_and_folder(tmp_path) -> None:
    cfg = transformers.AutoConfig.for_model("distilbert", dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                            vocab_size=128, max_position_embeddings=64)
    d = tmp_path / "distil"
    random_model_encoder = transformers.AutoModel.from_config(cfg)
    random_model_encoder.save_pretrained(d)
    p = profile(str(d))
    assert p.kind == "encoder" and p.kv_bytes_per_token == 0 and p.layers_prefix == "transformer.layer"
    assert p.weights_bytes == sum(x.numel() * x.element_size() for x in random_model_encoder.parameters())


def test_unknown_model_type_in_config(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-real-arch", "hidden_size": 8}))
    with pytest.raises(UnknownModelError, match="not-a-real-arch"):
        profile(str(tmp_path))


def test_public_api_profile() -> None:
    p = vramancer.profile("qwen2.5-7b", dtype="bf16")
    assert isinstance(p, ModelProfile) and p.dtype == "bfloat16" and p.arch == "qwen2"
    assert p.blocks[1].modules == ["model.layers.0"] and p.layers_prefix == "model.layers"
