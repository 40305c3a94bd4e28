"""MoE routed experts in host RAM, run by the split runtime (runtime/experts.py): tiny Mixtral,
Qwen2-MoE and Qwen3-MoE over 2-3 simulated GPUs + cpu, with GPU budgets too small for whole MoE layers,
planned by the planner's experts placement (plan/experts.py). Greedy ids equal the unsplit model's,
each experts module lives (and runs) on the host, measured bytes equal the plan's exactly, the hooks
come off at detach."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from vramancer.errors import BadInputError  # noqa: E402

VOCAB = 96
_COMMON = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=128,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, decoder_sparse_step=2),
    "qwen3_moe": dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1),
}
# GPU budgets where whole MoE layers do not all fit on the GPUs but their attention does (and the
# prefill copy of one layer's experts)
DEVICES = {
    ("mixtral", 2): "rtx3090:380KiB,rtx3060:280KiB,cpu:8GiB",
    ("mixtral", 3): "rtx3090:240KiB,rtx3060:230KiB,rtx4090:240KiB,cpu:8GiB",
    ("qwen2_moe", 2): "rtx3090:300KiB,rtx3060:230KiB,cpu:8GiB",
    ("qwen3_moe", 2): "rtx3090:260KiB,rtx3060:220KiB,cpu:8GiB",
    ("qwen3_moe", 3): "rtx3090:210KiB,rtx3060:200KiB,rtx4090:210KiB,cpu:8GiB",
}
NEW_TOKENS = 16


def build_moe(arch: str, seed: int = 0):
    cfg = transformers.AutoConfig.for_model(arch, **_COMMON, **MOE[arch])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():   # a larger spread than the init makes greedy choices decisive
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory):
    """Each MoE model saved with save_pretrained (per-expert tensors, fused by transformers on load)."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for arch in MOE:
        folder = root / arch
        build_moe(arch).save_pretrained(folder, safe_serialization=True)
        out[arch] = folder
    return out


def moe_plan(target, devices: str, context: int = 64, backing: str = "cpu"):
    """The planner's experts-in-host-RAM plan for ``devices`` (the placement the planner builds; on models
    this small its per-block overheads make it prefer whole-layer offload, so it is asked directly)."""
    from vramancer.devices.spec import parse_devices
    from vramancer.models.resolve import profile
    from vramancer.plan.experts import experts_on_host
    from vramancer.plan.planner import plan, plan_profile

    whole = plan(target, devices=devices, context=context, reserve_bytes=0, moe_experts_on_host=False,
                 backing=backing)
    assert whole.offloaded, "the budget must push whole MoE layers off the GPUs"
    alt = experts_on_host(profile(target), parse_devices(devices, backing=backing), whole.workload, 0, whole,
                          plan_profile)
    assert alt is not None and any(b.experts_device for b in alt.blocks) and not alt.offloaded
    return alt


def _greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False)


def _prompt(seed: int = 1, tokens: int = 6):
    return torch.randint(3, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(seed))


def _check_experts(model, plan):
    rt = model.vramancer
    moved = {b: blk for b, blk in enumerate(plan.blocks) if blk.experts_device is not None}
    rep = rt.memory_report()
    for st, row in zip(plan.stages, rep.stages, strict=True):
        assert row.weights_bytes == st.weights_bytes, (row.stage, row.weights_bytes, st.weights_bytes)
        assert row.misplaced == []
    assert [e.block for e in rep.experts] == sorted(moved)
    for e in rep.experts:
        assert e.weights_bytes == e.planned_weights_bytes == moved[e.block].experts_bytes
        assert e.device == moved[e.block].experts_device and e.torch_device == "cpu" and not e.misplaced
        mod = model.get_submodule(e.module)
        assert all(p.device.type == "cpu" for p in mod.parameters())
    # per device: what the runtime holds equals what the plan says each device holds (weights)
    assert rep.weights_bytes_by_device() == plan.weights_bytes_by_device()
    assert rep.to_dict()["experts"][0]["over_plan"] is False
    assert "MoE experts of" in rep.table()
    return rep


@pytest.mark.parametrize("arch,n_gpus", sorted(DEVICES))
def test_experts_on_host_greedy_equals_unsplit(moe_folders, arch, n_gpus):
    from vramancer.runtime.loader import load

    folder = moe_folders[arch]
    plan = moe_plan(str(folder), DEVICES[(arch, n_gpus)])
    # 3 GPUs: a 40-token prompt, whose prefill runs the experts on the layer's GPU (weights copied there)
    ids = _prompt(tokens=40 if n_gpus == 3 else 6)
    ref = _greedy(transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), ids)
    model = load(folder, plan=plan)
    rt = model.vramancer
    assert rt.experts_hooks.attached
    assert len({s.device for s in plan.stages}) >= 2
    out = _greedy(model, ids)
    assert torch.equal(out, ref)
    n_moved = sum(1 for b in plan.blocks if b.experts_device)
    # every host experts module ran once per forward (prefill + NEW_TOKENS - 1 decode steps)
    stats = rt.experts_hooks.stats
    assert stats.forwards == n_moved * NEW_TOKENS
    assert stats.copied_forwards == (n_moved if n_gpus == 3 else 0)
    assert stats.host_path_forwards == stats.forwards - stats.copied_forwards   # host_experts_forward
    assert stats.copied_bytes == (sum(b.experts_bytes for b in plan.blocks) if n_gpus == 3 else 0)
    _check_experts(model, plan)
    hooked = [model.get_submodule(e.name) for s in rt.stages for e in s.host_experts]
    assert len(hooked) == n_moved and all(m._forward_pre_hooks and m._forward_hooks for m in hooked)
    rt.detach()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in hooked)


def test_fused_checkpoint_and_plan_json(moe_folders, tmp_path):
    """A checkpoint that stores the fused expert tensors under the model's own names, loaded from a plan
    read back from JSON: same tokens as the per-expert checkpoint's unsplit model."""
    from vramancer.plan.plan import Plan
    from vramancer.runtime.loader import load

    src = moe_folders["mixtral"]
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    fused = tmp_path / "fused"
    fused.mkdir()
    ref_model.config.save_pretrained(fused)
    sd = {k: v.contiguous() for k, v in ref_model.state_dict().items() if k != "lm_head.weight"
          or not ref_model.config.tie_word_embeddings}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    save_file(sd, str(fused / "model.safetensors"), metadata={"format": "pt"})
    plan = Plan.from_json(moe_plan(str(fused), DEVICES[("mixtral", 2)]).to_json())
    model = load(fused, plan=plan)
    ids = _prompt(seed=3)
    assert torch.equal(_greedy(model, ids), _greedy(ref_model, ids))
    _check_experts(model, plan)


def test_module_split_in_place():
    """An nn.Module split in place: its experts move to the host, its output stays the same."""
    from vramancer.runtime.loader import load

    ref = build_moe("qwen3_moe", seed=4)
    ids = _prompt(seed=5)
    want = _greedy(ref, ids)
    model = build_moe("qwen3_moe", seed=4)
    plan = moe_plan(model, DEVICES[("qwen3_moe", 3)])
    load(model, plan=plan)
    assert torch.equal(_greedy(model, ids), want)
    _check_experts(model, plan)


def test_plan_for_another_model_refused_in_one_line(moe_folders):
    from vramancer.runtime.experts import experts_module_name

    model = build_moe("qwen3_moe")
    assert experts_module_name(model, "model.layers.1.mlp.experts", ["model.layers.1"]) == "model.layers.1.mlp.experts"
    mix = build_moe("mixtral")   # checkpoint names (block_sparse_moe) through transformers' renaming
    assert experts_module_name(mix, "model.layers.2.block_sparse_moe.experts",
                               ["model.layers.2"]) == "model.layers.2.mlp.experts"
    with pytest.raises(BadInputError, match="no such module") as e:
        experts_module_name(model, "model.layers.1.mlp.experts", ["model.embed_tokens"])
    assert "\n" not in str(e.value)


@pytest.mark.gpu
def test_experts_on_host_with_a_cuda_gpu(moe_folders):
    """On a real GPU: attention on it, the experts' weights on the CPU; decode moves the routed tokens to
    the host and back, a 40-token prefill copies each layer's experts to the GPU and drops the copy."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from vramancer.runtime.loader import load

    folder = moe_folders["mixtral"]
    plan = moe_plan(str(folder), DEVICES[("mixtral", 2)], backing="cuda:0")
    ids = _prompt(tokens=40)
    ref = _greedy(transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), ids)
    model = load(folder, plan=plan)
    assert torch.equal(_greedy(model, ids).cpu(), ref)
    stats = model.vramancer.experts_hooks.stats
    n_moved = sum(1 for b in plan.blocks if b.experts_device)
    assert stats.copied_forwards == n_moved and stats.to_host_bytes > 0 and stats.back_bytes > 0
    _check_experts(model, plan)
    assert all(p.device.type == "cuda" for n, p in model.named_parameters() if ".experts." not in n)


def test_vramancer_run_with_an_experts_plan(tmp_path, capsys):
    """`vramancer plan`'s JSON with experts in host RAM, run by `vramancer run --plan`: the unsplit
    model's tokens; the memory JSON lists each experts module at its planned bytes."""
    import json

    from vramancer.cli import main as cli
    from vramancer.runtime.demo_model import build_demo_tokenizer

    tok = build_demo_tokenizer()
    cfg = transformers.AutoConfig.for_model("mixtral", **{**_COMMON, "vocab_size": len(tok)}, **MOE["mixtral"])
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    folder = tmp_path / "moe-chat"
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    budget = "rtx3090:560KiB,rtx3060:460KiB,cpu:8GiB"     # the embeddings are larger with this vocabulary
    plan_file = tmp_path / "plan.json"
    moe_plan(str(folder), budget, context=128).save(plan_file)
    enc = tok("Experts stay in host RAM", return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    rc = cli(["run", str(folder), "--prompt", "Experts stay in host RAM", "--max-new-tokens", "8",
              "--plan", str(plan_file), "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert d["generation"]["token_ids"] == ref[0, enc["input_ids"].shape[1]:].tolist()
    moved = [b for b in d["plan"]["blocks"] if b.get("experts_device")]
    assert moved and d["plan"]["experts"][0]["kind"] == "experts"
    assert [(e["weights_bytes"], e["planned_weights_bytes"]) for e in d["memory"]["experts"]] == \
        [(b["experts_bytes"], b["experts_bytes"]) for b in moved]


def test_live_view_counts_the_experts_on_the_host(moe_folders):
    """The simulated host's live sample holds the experts' bytes (what the memory report says)."""
    from vramancer.runtime.loader import load

    folder = moe_folders["mixtral"]
    plan = moe_plan(str(folder), DEVICES[("mixtral", 2)])
    model = load(folder, plan=plan)
    from vramancer.runtime.telemetry_feed import StageFeed

    feed = StageFeed(plan).attach(model.vramancer)
    host = {s.device: s.used_bytes for s in feed.device_samples()}["cpu"]
    assert host == sum(b.experts_bytes for b in plan.blocks if b.experts_device)
    feed.detach()


@pytest.mark.parametrize("arch", sorted(MOE))
def test_whole_layers_on_the_host_decode_by_the_host_path(moe_folders, arch):
    """A plan that runs whole MoE layers on the host (a CPU stage): their experts' decode forwards take
    host_experts_forward too (selected experts only), with the unsplit model's tokens and logits exactly;
    the prefill (40 tokens) keeps the module's own forward; detach restores the module's forward."""
    from vramancer.plan.planner import plan as make_plan
    from vramancer.runtime.experts import runs_host_path
    from vramancer.runtime.loader import load

    folder = moe_folders[arch]
    plan = make_plan(str(folder), devices="cpu:4GiB", context=64, reserve_bytes=0)
    assert all(b.experts_device is None for b in plan.blocks)
    ids = _prompt(tokens=40)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ref = _greedy(ref_model, ids)
    model = load(folder, plan=plan)
    rt = model.vramancer
    out = _greedy(model, ids)
    assert torch.equal(out, ref)
    with torch.no_grad():
        assert torch.equal(model(out).logits, ref_model(out).logits)   # 56 tokens: the module's own forward
        step = model(out[:, :1]).logits                                 # 1 token: the host path
        assert torch.equal(step, ref_model(out[:, :1]).logits)
    stats = rt.experts_hooks.stats
    n_layers = sum(1 for m in model.modules() if runs_host_path(m))
    assert n_layers == sum(1 for m in ref_model.modules() if runs_host_path(m)) > 0
    assert stats.cpu_layer_forwards == n_layers * (NEW_TOKENS - 1 + 1)   # decode steps + the 1-token forward
    patched = [m for m in model.modules() if "forward" in vars(m)]
    assert len(patched) == n_layers
    rt.detach()
    assert not [m for m in model.modules() if "forward" in vars(m)]
