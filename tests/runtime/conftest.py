"""Tiny random models of real architectures, saved as real safetensors folders, and plans over
simulated devices for them."""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 96
# (class name, config class name, config kwargs); every model has 4 repeated layers -> 6 blocks
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(_COMMON)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_COMMON, sliding_window=8)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(_COMMON)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config",
               dict(_COMMON, head_dim=8, sliding_window=8, attn_logit_softcapping=20.0,
                    final_logit_softcapping=15.0, query_pre_attn_scalar=8)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(_COMMON)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=128,
                  bos_token_id=1, eos_token_id=2)),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                dict(_COMMON, num_local_experts=4, num_experts_per_tok=2)),
    "bert": ("BertModel", "BertConfig",
             dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=128)),
}
CAUSAL = [a for a in ARCHS if a != "bert"]


def build_model(arch: str, seed: int = 0):
    cls_name, cfg_name, kw = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    # random init leaves near-uniform logits; a larger spread makes greedy choices decisive
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Offload files and demo models go under a temp cache folder, never the user's."""
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / "vramancer-cache"))


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    """Every ARCHS model saved once per session (safetensors); returns folder by arch."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ARCHS:
        m = build_model(arch)
        folder = root / arch
        m.save_pretrained(folder, safe_serialization=True)
        out[arch] = folder
    return out


GPUS = {2: "rtx3090,rtx3060", 3: "rtx3090,rtx3060,rtx4090"}


def make_plan(target, n_stages: int, context: int = 64, devices: str | None = None, dtype: str | None = None,
              batch: int = 1, backing: str = "cpu"):
    """A plan splitting ``target`` (folder or nn.Module) evenly over ``n_stages`` GPUs (simulated
    ones backed by ``backing`` unless ``devices`` names others)."""
    from vramancer.plan.planner import plan

    return plan(target if not isinstance(target, Path) else str(target),
                devices=devices or GPUS[n_stages], split=[1] * n_stages, context=context,
                dtype=dtype, batch=batch, backing=backing)


def placed_plan(target, devices: str, offload_mode: str | None, context: int = 64, dtype: str | None = None,
                batch: int = 1, backing: str = "cpu"):
    """A plan of ``target`` over ``devices`` (three items, e.g. "rtx3090,cpu,disk"), one stage on each,
    with the block boundaries of an even 3-GPU split, made by the planner's ``plan_placement``
    (so modes, compute devices and stream buffers are the planner's)."""
    from vramancer.devices.spec import parse_devices
    from vramancer.models.resolve import profile
    from vramancer.plan.plan import Workload
    from vramancer.plan.planner import plan_placement

    even = make_plan(target, 3, context=context, dtype=dtype, batch=batch, backing=backing)
    devs = parse_devices(devices, backing=backing)
    block_devices = [devs[i].id for i, st in enumerate(even.stages) for _ in range(*st.blocks)]
    prof = profile(target if not isinstance(target, Path) else str(target), dtype=dtype)
    workload = Workload(context=context, batch=batch, dtype=prof.dtype)
    return plan_placement(prof, devs, workload, block_devices, offload_mode=offload_mode)


def offload_plan(target, context: int = 64, dtype: str | None = None, batch: int = 1, backing: str = "cpu"):
    """Three stages: blocks on a simulated GPU, then host RAM streamed to it, then disk streamed to it."""
    return placed_plan(target, "rtx3090,cpu,disk", "stream", context=context, dtype=dtype, batch=batch,
                       backing=backing)
