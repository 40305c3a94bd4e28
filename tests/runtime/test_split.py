"""Split execution gives the unsplit model's output: greedy ids equal, logits within float tolerance,
for real architectures split over 2 and 3 simulated GPUs, with streamed host and disk stages, and for
an nn.Module split in place. Measured bytes per stage equal the plan's."""
from __future__ import annotations

import pytest

from .conftest import ARCHS, CAUSAL, VOCAB, build_model, make_plan, offload_plan

torch = pytest.importorskip("torch")

NEW_TOKENS = 20
PROMPT = 6


def _prompt(batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, PROMPT), generator=g)


def _greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False)


_REFERENCE: dict = {}


def _reference(arch: str, batch: int = 1, seed: int = 1):
    """(prompt, greedy ids, reference model) of the unsplit model, computed once per session."""
    key = (arch, batch, seed)
    if key not in _REFERENCE:
        ref = build_model(arch)
        ids = _prompt(batch, seed)
        _REFERENCE[key] = (ids, _greedy(ref, ids), ref)
    return _REFERENCE[key]


def _load(folder, plan):
    from vramancer.runtime.loader import load

    return load(folder, plan=plan)


def _kv_expected(target, plan, tokens: int, batch: int) -> list[int]:
    """Per stage: kv_bytes_per_token x tokens x batch over its blocks. A sliding-window layer of
    window w keeps w - 1 tokens between steps (transformers' DynamicSlidingWindowLayer); the plan
    sizes w, what the layer holds while a step runs."""
    import vramancer

    prof = vramancer.profile(target if not hasattr(target, "is_dir") else str(target))
    out = []
    for st in plan.stages:
        n = 0
        for b in prof.blocks[st.blocks[0]:st.blocks[1]]:
            held = tokens if b.kv_window is None else min(tokens, b.kv_window - 1)
            n += b.kv_bytes_per_token * held * batch
        out.append(n)
    return out


def _check_bytes(model, plan, tokens: int, batch: int = 1, target=None):
    """Weights per stage equal the plan's exactly; the KV cache equals the plan's when the plan's
    context is the number of tokens the cache holds (sliding windows: see _kv_expected)."""
    rep = model.vramancer.memory_report()
    for st, row, rs in zip(plan.stages, rep.stages, model.vramancer.stages):
        assert row.weights_bytes == st.weights_bytes, (row.stage, row.weights_bytes, st.weights_bytes)
        assert row.misplaced == []
        assert row.kv_devices == ([str(rs.compute_device)] if row.kv_cache_bytes else [])
    assert rep.kv_tokens == tokens and rep.batch == batch
    kv = [r.kv_cache_bytes for r in rep.stages]
    assert kv == _kv_expected(target if target is not None else model, plan, tokens, batch)
    if not any(getattr(model.config, k, None) for k in ("sliding_window",)):
        assert kv == [s.kv_cache_bytes for s in plan.stages]
    assert not any(r.over_plan for r in rep.stages)
    return rep


@pytest.mark.parametrize("n_stages", [2, 3])
@pytest.mark.parametrize("arch", CAUSAL)
def test_split_generation_matches_unsplit(saved_models, arch, n_stages):
    folder = saved_models[arch]
    ids, want, ref = _reference(arch)
    # the cache holds every token but the last generated one
    tokens = PROMPT + NEW_TOKENS - 1
    plan = make_plan(folder, n_stages, context=tokens)
    model = _load(folder, plan)
    assert len(model.vramancer.stages) == n_stages
    got = _greedy(model, ids)
    assert got.tolist() == want.tolist()
    _check_bytes(model, plan, tokens, target=folder)
    with torch.no_grad():
        full = torch.cat([ids, want[:, PROMPT:]], dim=1)
        torch.testing.assert_close(model(full).logits, ref(full).logits, rtol=1e-5, atol=1e-5)
    # every stage after the first was entered once per forward, with a [batch, tokens, hidden] tensor
    rt = model.vramancer
    for st in rt.stages[1:]:
        assert st.stats.crossings == rt.forwards
    model.vramancer.detach()


def test_bert_hidden_states_match(saved_models):
    folder = saved_models["bert"]
    ref = build_model("bert")
    ids = _prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    for n in (2, 3):
        plan = make_plan(folder, n)
        model = _load(folder, plan)
        with torch.no_grad():
            got = model(ids, attention_mask=mask)
            want = ref(ids, attention_mask=mask)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-5, atol=1e-5)
        rep = model.vramancer.memory_report()
        assert [r.weights_bytes for r in rep.stages] == [s.weights_bytes for s in plan.stages]
        model.vramancer.detach()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral", "gemma2"])
def test_streamed_host_and_disk_stages(saved_models, arch):
    """Stage 1 streams from host RAM, stage 2 from the checkpoint on disk, both onto stage 0's device."""
    folder = saved_models[arch]
    ids, want, _ = _reference(arch, batch=2, seed=3)
    tokens = PROMPT + NEW_TOKENS - 1
    plan = offload_plan(folder, context=tokens, batch=2)
    model = _load(folder, plan)
    rt = model.vramancer
    assert [s.mode for s in rt.stages] == ["execute", "stream", "stream"]
    assert [s.compute_device for s in plan.stages] == [plan.stages[0].device] * 3
    got = _greedy(model, ids)
    assert got.tolist() == want.tolist()
    rep = _check_bytes(model, plan, tokens, batch=2, target=folder)
    (engine,) = rt.engines
    assert engine.loads > 0 and engine.copied_bytes > 0
    # one stream buffer, on the GPU both streamed stages run on: allocated exactly as planned, the
    # two slots of the largest streamed block (its own weights and the tied ones it uses)
    (buf,) = plan.stream_buffers
    assert buf.device == plan.stages[0].device and buf.stages == (1, 2)
    assert buf.buffer_bytes == 2 * max(b.streamed_bytes for b in plan.blocks[plan.stages[1].blocks[0]:])
    assert [(b.device, b.buffer_bytes, b.planned_buffer_bytes, b.stages) for b in rep.stream_buffers] == \
        [(buf.device, engine.buffer_bytes, buf.buffer_bytes, (1, 2))]
    assert engine.buffer_bytes == buf.buffer_bytes > 0
    # between uses, streamed parameters are back home: host tensors, disk ones not in memory at all
    for unit in rt.stages[1].stream_units:
        assert all(p.owner._parameters[p.attr].device.type == "cpu" for p in unit.params)
    for unit in rt.stages[2].stream_units:
        assert all(p.owner._parameters[p.attr].device.type == "meta" for p in unit.params)
    rt.detach()


def test_module_split_in_place():
    import vramancer

    ids, want, ref = _reference("llama")
    model = build_model("llama")
    plan = make_plan(model, 3, context=PROMPT + NEW_TOKENS - 1)
    out = vramancer.load(model, plan=plan)
    assert out is model
    assert _greedy(model, ids).tolist() == want.tolist()
    _check_bytes(model, plan, PROMPT + NEW_TOKENS - 1, target=ref)
    model.vramancer.detach()
    assert not hasattr(model, "vramancer")
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_module_with_disk_stage_writes_offload_file(tmp_path):
    ids, want, _ = _reference("gpt2")
    model = build_model("gpt2")
    plan = offload_plan(model, context=PROMPT + NEW_TOKENS - 1)
    from vramancer.runtime.loader import load

    load(model, plan=plan, offload_dir=str(tmp_path))
    assert list(tmp_path.glob("*.safetensors"))
    assert _greedy(model, ids).tolist() == want.tolist()
    model.vramancer.detach()


def test_tied_weights_copied_per_stage(saved_models):
    """GPT-2 ties the LM head to the token embeddings: on two stages each holds its own copy;
    on one stage they stay one tensor."""
    folder = saved_models["gpt2"]
    model = _load(folder, make_plan(folder, 2))
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, model.transformer.wte.weight)
    model.vramancer.detach()
    one = _load(folder, make_plan(folder, 1, devices="rtx4090"))
    assert one.lm_head.weight is one.transformer.wte.weight
    one.vramancer.detach()


def test_stage_runs_alone_on_hidden_states(saved_models):
    """A stage is a tensors-in / tensors-out unit: fed the hidden states and layer arguments the
    model gave its first layer, with a cache of its own, it returns what its last layer returned."""
    folder = saved_models["gemma2"]  # hybrid sliding / full attention: per-layer masks
    model = _load(folder, make_plan(folder, 3))
    st = model.vramancer.stages[1]
    first, last = st.layers[0][1], st.layers[-1][1]
    seen: dict = {}

    def grab_in(mod, args, kwargs):
        seen.setdefault("args", args)
        seen.setdefault("kwargs", dict(kwargs))

    def grab_out(mod, args, kwargs, out):
        seen.setdefault("out", out[0] if isinstance(out, tuple) else out)

    h1 = first.register_forward_pre_hook(grab_in, with_kwargs=True)
    h2 = last.register_forward_hook(grab_out, with_kwargs=True)
    ids = _prompt(seed=5)
    with torch.no_grad():
        model(ids)
    h1.remove()
    h2.remove()
    hidden, *rest = seen["args"]
    kwargs = dict(seen["kwargs"])
    kwargs["cache"] = st.new_cache()
    got = st.forward(hidden, *rest, **kwargs)
    torch.testing.assert_close(got, seen["out"], rtol=0, atol=0)
    cache = kwargs["cache"]
    filled = [i for i, layer in enumerate(cache.layers) if getattr(layer, "keys", None) is not None
              and layer.keys.numel()]
    assert filled == st.layer_indices
    model.vramancer.detach()


def test_checkpoint_mismatch_lists_names(saved_models, tmp_path):
    from safetensors.torch import load_file, save_file

    import vramancer
    from vramancer.errors import CheckpointMismatchError

    src = saved_models["llama"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    plan = make_plan(src, 2)
    with pytest.raises(CheckpointMismatchError) as e:
        vramancer.load(str(bad), plan=plan)
    assert e.value.missing == ["model.layers.2.mlp.up_proj.weight"]
    assert e.value.unexpected == ["model.layers.9.extra.weight"]
    assert "model.layers.2.mlp.up_proj.weight" in str(e.value) and "\n" not in str(e.value)


def test_out_of_memory_names_device_and_stage(saved_models, monkeypatch):
    import vramancer
    from vramancer.errors import DeviceOutOfMemoryError
    from vramancer.runtime import loader

    folder = saved_models["llama"]
    plan = make_plan(folder, 2)
    real = loader._Placer._materialize
    calls = {"n": 0}

    def failing(self, name, *a, **k):
        if self.stage_now == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        calls["n"] += 1
        return real(self, name, *a, **k)

    monkeypatch.setattr(loader._Placer, "_materialize", failing)
    with pytest.raises(DeviceOutOfMemoryError) as e:
        vramancer.load(str(folder), plan=plan)
    assert e.value.stage == 1 and e.value.device == plan.stages[1].device
    assert plan.stages[1].device in str(e.value) and "stage 1" in str(e.value)
    assert calls["n"] > 0


def test_dtype_conversion_on_load(saved_models):
    folder = saved_models["qwen2"]
    plan = make_plan(folder, 2, dtype="bfloat16")
    model = _load(folder, plan)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    rep = model.vramancer.memory_report()
    assert [r.weights_bytes for r in rep.stages] == [s.weights_bytes for s in plan.stages]
    ids = _prompt()
    assert _greedy(model, ids).shape == (1, PROMPT + NEW_TOKENS)
    model.vramancer.detach()


def test_archs_cover_the_issue_list():
    assert {"llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2", "mixtral", "bert"} <= set(ARCHS)


def test_out_of_memory_while_generating_names_the_stage(saved_models):
    from vramancer.errors import DeviceOutOfMemoryError
    from vramancer.runtime.generate import generate_ids

    folder = saved_models["llama"]
    plan = make_plan(folder, 3)
    model = _load(folder, plan)
    st = model.vramancer.stages[2]
    boom = {"after": 3}

    def out_of_memory(mod, args):
        boom["after"] -= 1
        if boom["after"] == 0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    h = st.layers[0][1].register_forward_pre_hook(out_of_memory)
    ids = _prompt()
    with pytest.raises(DeviceOutOfMemoryError) as e:
        generate_ids(model, {"input_ids": ids}, max_new_tokens=8)
    h.remove()
    assert e.value.stage == 2 and e.value.device == plan.stages[2].device
    assert "stage 2" in str(e.value) and plan.stages[2].device in str(e.value)
    model.vramancer.detach()


def test_sharded_checkpoint_planned_by_load(tmp_path):
    """A checkpoint in several shards with an index; vramancer.load plans it from its keywords."""
    import vramancer

    ids, want, ref = _reference("phi3")
    folder = tmp_path / "sharded"
    ref.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    model = vramancer.load(str(folder), devices="rtx3090,rtx3060,rtx4090", split=[2, 1, 1], context=64)
    rt = model.vramancer
    assert [s.plan.device for s in rt.stages] == ["rtx3090#0", "rtx3060-12gb#0", "rtx4090#0"]
    assert _greedy(model, ids).tolist() == want.tolist()
    rt.detach()


def test_cpu_execute_and_disk_stages_without_a_gpu(saved_models):
    """Offloaded stages not streamed to the GPU: a cpu stage runs where it is, a disk stage (which
    always streams) streams from its file to the host."""
    from .conftest import placed_plan

    folder = saved_models["qwen2"]
    ids, want, _ = _reference("qwen2")
    plan = placed_plan(folder, "rtx3090,cpu,disk", "execute", context=PROMPT + NEW_TOKENS - 1)
    assert [(s.mode, s.compute_device) for s in plan.stages] == \
        [("execute", "rtx3090#0"), ("execute", "cpu"), ("stream", "cpu")]
    model = _load(folder, plan)
    rt = model.vramancer
    assert [s.mode for s in rt.stages] == ["execute", "execute", "stream"]
    assert str(rt.stages[2].compute_device) == "cpu"
    assert _greedy(model, ids).tolist() == want.tolist()
    _check_bytes(model, plan, PROMPT + NEW_TOKENS - 1, target=folder)
    rt.detach()


def test_long_prompt_prefills_in_plan_chunks(saved_models):
    """A prompt longer than the plan's prefill chunk runs in chunks (the workspace the plan sized),
    with the same tokens as one unchunked prefill of the unsplit model."""
    from vramancer.plan.planner import plan as make
    from vramancer.runtime.generate import generate_ids

    folder = saved_models["mistral"]  # sliding window 8: chunks cross the window
    ref = build_model("mistral")
    ids = torch.randint(3, VOCAB, (1, 23), generator=torch.Generator().manual_seed(9))
    want = _greedy(ref, ids)
    plan = make(str(folder), devices="rtx3090,rtx3060", split=[1, 1], context=64, prefill_chunk=5)
    model = _load(folder, plan)
    rt = model.vramancer
    before = rt.forwards
    got = generate_ids(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS)
    assert got.tolist() == want.tolist()
    assert rt.forwards - before == 5 + NEW_TOKENS - 1  # ceil(23 / 5) prefill chunks, then one per token
    rt.detach()
