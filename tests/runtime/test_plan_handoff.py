"""The Plan is the one hand-off to the runtime: the runtime reads the blocks' modules, the stages'
modes and compute devices and the stream buffers from it (never a profile of the model), refuses a
plan made for another model in one line, and runs a disk-only plan (weights streamed from the
checkpoint to the host) with the unsplit model's greedy output."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import build_model, make_plan, offload_plan

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [[5, 17, 33, 8, 61, 12]]
NEW_TOKENS = 8


def _greedy(model):
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False).tolist()


@pytest.fixture(scope="module")
def twin_folders(tmp_path_factory):
    """Two Llamas with a tokenizer and the same block count, but different MLP widths."""
    from vramancer.serve.testing import build_tiny_chat_model

    root = tmp_path_factory.mktemp("twins")
    return [build_tiny_chat_model(root / name, hidden_size=32, intermediate_size=width, max_position_embeddings=256)
            for name, width in (("narrow", 48), ("wide", 64))]


def test_runtime_never_profiles_the_model(saved_models, monkeypatch):
    """Loading per a plan reads the plan's blocks: with the profiler made to fail, it still loads
    and gives the unsplit model's tokens."""
    import vramancer.models.resolve as resolve
    from vramancer.runtime.loader import load

    folder = saved_models["gpt2"]
    plan = offload_plan(folder, context=len(PROMPT[0]) + NEW_TOKENS)

    def no_profile(*a, **k):
        raise AssertionError("the runtime profiled the model")

    monkeypatch.setattr(resolve, "profile", no_profile)
    model = load(str(folder), plan=plan)
    assert _greedy(model) == _greedy(build_model("gpt2"))
    rt = model.vramancer
    assert [s.mode for s in rt.stages] == [s.mode for s in plan.stages]
    assert [(u[0], st.index) for st in rt.stages for u in st.units] == \
        [(m, si) for si, s in enumerate(plan.stages) for b in plan.blocks[s.blocks[0]:s.blocks[1]] for m in b.modules]
    rt.free()


def test_plan_naming_modules_the_model_lacks_is_refused(saved_models):
    from dataclasses import replace

    from vramancer.errors import BadInputError
    from vramancer.runtime.loader import load

    folder = saved_models["llama"]
    plan = make_plan(folder, 2)
    plan.blocks[2] = replace(plan.blocks[2], modules=("model.blocks.1",))
    plan.identity = replace(plan.identity, config_sha256=None)     # past the identity check
    with pytest.raises(BadInputError) as e:
        load(str(folder), plan=plan)
    assert "'model.blocks.1'" in str(e.value) and "\n" not in str(e.value)


def test_plan_for_another_model_is_refused(twin_folders, tmp_path, capsys):
    from vramancer.cli import main as cli
    from vramancer.errors import BadInputError
    from vramancer.runtime.loader import load

    narrow, wide = twin_folders
    plan = make_plan(narrow, 2)
    other = make_plan(wide, 2)
    assert len(plan.blocks) == len(other.blocks) and plan.identity != other.identity
    with pytest.raises(BadInputError) as e:
        load(str(wide), plan=plan)
    want = (f"plan made for {narrow} (config {plan.identity.config_sha256[:8]}…), this is {wide} "
            f"(config {other.identity.config_sha256[:8]}…)")
    assert str(e.value).startswith(want) and "\n" not in str(e.value)
    # the same plan file through `run --plan`: exit 2, one line, nothing loaded
    path = tmp_path / "narrow.json"
    plan.save(path)
    assert cli(["run", str(wide), "--prompt", "hi", "--plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "plan made for" in err and "Traceback" not in err
    # a schema-1 file (an older VRAMancer): refused with the command to re-plan
    old = plan.to_dict()
    old["schema"] = 1
    path.write_text(json.dumps(old))
    assert cli(["run", str(narrow), "--prompt", "hi", "--plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "schema 1" in err and "re-plan" in err


def test_disk_only_load_matches_unsplit(saved_models):
    """``load(..., devices="disk")``: every weight streams from the checkpoint into the host's one
    stream buffer, sized by the plan; nothing of the model is resident."""
    import vramancer
    from vramancer.plan.plan import HOST_COMPUTE

    folder = saved_models["llama"]
    model = vramancer.load(str(folder), devices="disk", context=32)
    rt = model.vramancer
    (st,) = rt.plan.stages
    assert (st.kind, st.mode, st.compute_device) == ("disk", "stream", HOST_COMPUTE)
    assert _greedy(model) == _greedy(build_model("llama"))
    rep = rt.memory_report()
    (buf,) = rep.stream_buffers
    assert (buf.device, buf.buffer_bytes, buf.stages) == (HOST_COMPUTE, rt.plan.stream_buffers[0].buffer_bytes, (0,))
    assert buf.buffer_bytes == buf.planned_buffer_bytes == 2 * max(b.streamed_bytes for b in rt.plan.blocks)
    assert rep.stages[0].weights_bytes == rt.plan.stages[0].weights_bytes
    assert all(p.device.type == "meta" for p in model.parameters())      # between forwards: nothing loaded
    rt.free()


def test_disk_only_run_from_the_command_line(tmp_path):
    """`vramancer run FOLDER --devices disk` gives the unsplit model's greedy tokens."""
    from vramancer.serve.testing import build_tiny_chat_model

    folder = build_tiny_chat_model(tmp_path / "chat", hidden_size=32, intermediate_size=48,
                                   max_position_embeddings=256)
    prompt = "Where does the memory go?"
    proc = subprocess.run([sys.executable, "-m", "vramancer", "run", str(folder), "--prompt", prompt,
                           "--devices", "disk", "--context", "64", "--max-new-tokens", "6", "--json"],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "VRAMANCER_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert [s["mode"] for s in doc["plan"]["stages"]] == ["stream"]
    got = doc["generation"]["token_ids"]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        want = ref.generate(**ids, max_new_tokens=6, do_sample=False,
                            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    assert got == want[0, ids["input_ids"].shape[-1]:].tolist()
    assert doc["memory"]["stream_buffers"][0]["buffer_bytes"] == doc["plan"]["stream_buffers"][0]["buffer_bytes"]


def test_plan_for_devices_this_machine_lacks_is_refused(saved_models):
    from dataclasses import replace

    from vramancer.errors import BadInputError
    from vramancer.runtime.loader import load

    folder = saved_models["llama"]
    plan = make_plan(folder, 2)
    plan.devices[1] = replace(plan.devices[1], torch_device="cuda:63")
    plan.stages[1] = replace(plan.stages[1], torch_device="cuda:63")
    plan.validate()                                  # a well-formed plan, made for another machine
    with pytest.raises(BadInputError) as e:
        load(str(folder), plan=plan)
    assert "stage 1 on cuda:63" in str(e.value) and "\n" not in str(e.value)
