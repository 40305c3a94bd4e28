"""`vramancer convert`: pytorch_model.bin (single and sharded, as old repos were saved with
torch.save of a state_dict), dtype casts, GGUF (written as llama.cpp writes a Llama), re-sharding by
plan stage; the result loads split and gives what transformers gives from the source."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..runtime.conftest import VOCAB, build_model
from .ggufs import write_llama_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vramancer.cli import main as cli  # noqa: E402


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    h = json.loads(raw[8:8 + n])
    h.pop("__metadata__", None)
    return h


def _ids():
    g = torch.Generator().manual_seed(5)
    return torch.randint(3, VOCAB, (1, 6), generator=g)


def _greedy(model, n=10):
    ids = _ids()
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)


def _split_greedy(folder: Path, n_stages: int = 2, plan=None):
    from vramancer.runtime.loader import load

    from ..runtime.conftest import make_plan

    plan = plan or make_plan(str(folder), n_stages)
    model = load(str(folder), plan=plan)
    try:
        return _greedy(model)
    finally:
        model.vramancer.detach()


def _bin_folder(model, folder: Path, shards: int = 1) -> Path:
    """A repo as old ones are: config.json + pytorch_model.bin (torch.save of the state dict), or
    pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json."""
    folder.mkdir(parents=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    sd = model.state_dict()
    if shards == 1:
        torch.save(sd, folder / "pytorch_model.bin")
        return folder
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in names[i * per:(i + 1) * per]}
        torch.save(part, folder / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_convert_gpt2_bin_with_tied_head(tmp_path, capsys):
    """GPT-2 saved by torch.save: the tied lm_head shares the embedding's storage and is written
    once; the converted folder gives from_pretrained(.bin)'s greedy output, split in two."""
    import vramancer

    src = _bin_folder(build_model("gpt2"), tmp_path / "gpt2-bin")
    dst = tmp_path / "gpt2"
    assert cli(["convert", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "from pytorch" in out and "written once" in out
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    header = _header(dst / "model.safetensors")
    assert "lm_head.weight" not in header and "transformer.wte.weight" in header
    ref = transformers.GPT2LMHeadModel.from_pretrained(src).eval()    # transformers reading the pickle itself
    assert torch.equal(_split_greedy(dst), _greedy(ref))
    assert vramancer.profile(str(dst)).weights_bytes == sum(p.numel() * p.element_size() for p in ref.parameters())
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_convert_sharded_bin_to_bfloat16(tmp_path, capsys):
    import vramancer

    model = build_model("llama")
    src = _bin_folder(model, tmp_path / "llama-bin", shards=3)
    dst = tmp_path / "llama-bf16"
    assert cli(["convert", str(src), str(dst), "--dtype", "bf16", "--max-shard-size", "30KiB"]) == 0
    capsys.readouterr()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and set(index["weight_map"]) == set(model.state_dict())
    total = 0
    for s in shards:
        h = _header(dst / s)
        assert {v["dtype"] for v in h.values()} == {"BF16"}
        assert all(index["weight_map"][k] == s for k in h)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in h.values())
    assert index["metadata"]["total_size"] == total == sum(t.numel() * 2 for t in model.state_dict().values())
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    got = {}
    for s in shards:
        got.update(load_file(dst / s))
    assert all(torch.equal(got[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())
    prof = vramancer.profile(str(dst))
    assert prof.dtype == "bfloat16" and prof.weights_bytes == total
    ref = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    assert torch.equal(_split_greedy(dst), _greedy(ref))


class Payload:
    """Stands for whatever a pickle may carry besides tensors: unpickling it would run its code."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_convert_refuses_a_pickle_with_code_and_leaves_nothing(tmp_path, capsys):
    src = tmp_path / "evil"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"w": torch.zeros(2), "x": Payload()}, src / "pytorch_model.bin")
    dst = tmp_path / "out"
    assert cli(["convert", str(src), str(dst)]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert len(err.splitlines()) == 1 and "refused" in err and "unpickled!" not in cap.out
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == ["evil"]


def test_convert_bad_input(tmp_path, capsys):
    src = _bin_folder(build_model("llama"), tmp_path / "m")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    cases = [
        (["convert", str(tmp_path / "nope"), str(tmp_path / "o1")], "not a file or folder"),
        (["convert", str(src), str(tmp_path / "taken")], "already exists"),
        (["convert", str(src), str(tmp_path / "o2"), "--dtype", "q4_k_m"], "float32, float16 or bfloat16"),
        (["convert", str(src), str(tmp_path / "missing-parent" / "o3")], "is not a folder"),
    ]
    for argv, text in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert text in err and len(err.splitlines()) == 1, (argv, err)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(100)))
    assert cli(["convert", str(junk), str(tmp_path / "o5")]) == 2
    err = capsys.readouterr().err.strip()
    assert "malformed GGUF file" in err and len(err.splitlines()) == 1
    (src / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    assert cli(["convert", str(src), str(tmp_path / "o4")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not (tmp_path / "o4").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_convert_gguf(tmp_path, capsys):
    """A Llama GGUF (Q8_0 matrices, llama.cpp names and q/k layout): every tensor equals what
    transformers' own GGUF loader produces, config.json is written, and the folder runs split
    with transformers' GGUF model's greedy output."""
    model = build_model("llama")
    gdir = tmp_path / "gguf"
    gdir.mkdir()
    write_llama_gguf(model, gdir / "tiny-q8_0.gguf")
    dst = tmp_path / "from-gguf"
    assert cli(["convert", str(gdir / "tiny-q8_0.gguf"), str(dst)]) == 0
    assert "from gguf" in capsys.readouterr().out
    ref = transformers.AutoModelForCausalLM.from_pretrained(gdir, gguf_file="tiny-q8_0.gguf").eval()
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 4
    from safetensors.torch import load_file

    got = load_file(dst / "model.safetensors")
    want = ref.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    err = max((got[k] - v).abs().max().item() for k, v in model.state_dict().items())
    assert 0 < err < 0.02                                                  # Q8_0 dequantised, not the original
    assert torch.equal(_split_greedy(dst), _greedy(ref))


def test_reshard_by_plan_then_load(tmp_path, capsys):
    """One shard per stage of a 3-stage plan: each shard holds exactly its stage's blocks' tensors,
    the index is right, and the re-sharded folder loads split with the same plan."""
    from ..runtime.conftest import make_plan

    model = build_model("qwen2")
    src = tmp_path / "qwen2"
    model.save_pretrained(src)
    plan = make_plan(str(src), 3)
    plan_file = tmp_path / "plan.json"
    plan.save(plan_file)
    dst = tmp_path / "by-stage"
    assert cli(["convert", str(src), str(dst), "--plan", str(plan_file)]) == 0
    capsys.readouterr()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    for si, shard in enumerate(shards):
        mods = [m for b in range(*plan.stages[si].blocks) for m in plan.blocks[b].modules]
        want = {k for k in model.state_dict() if any(k.startswith(m + ".") for m in mods)}
        assert set(_header(dst / shard)) == want, si
    assert torch.equal(_split_greedy(dst, plan=plan), _greedy(model))


def test_convert_gguf_with_tokenizer_then_run(tmp_path, capsys):
    """A GGUF holding its tokenizer (byte-level BPE and chat template, as llama.cpp's converter
    stores it): convert writes the tokenizer transformers builds from it, in bf16 the folder runs
    with `vramancer run`, and the tokens equal transformers' GGUF model's."""
    from tests.models.tiny import chat_llama
    from vramancer.runtime.gguf.write import write_gguf

    model, tok = chat_llama(num_hidden_layers=2, intermediate_size=64, max_position_embeddings=128, std=None)
    gdir = tmp_path / "g"
    gdir.mkdir()
    write_gguf(model, gdir / "m.gguf", "Q8_0", tokenizer=tok)
    dst = tmp_path / "m"
    assert cli(["convert", str(gdir / "m.gguf"), str(dst), "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    got_tok = transformers.AutoTokenizer.from_pretrained(dst)
    assert got_tok("Once upon a time")["input_ids"] == tok("Once upon a time")["input_ids"]
    assert {v["dtype"] for v in _header(dst / "model.safetensors").values()} == {"BF16"}
    rc = cli(["run", str(dst), "--prompt", "Once upon a time", "--max-new-tokens", "6", "--devices",
              "rtx3090,rtx3060", "--split", "1,1", "--context", "64", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(gdir, gguf_file="m.gguf", dtype=torch.bfloat16).eval()
    enc = got_tok("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        want = ref.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert json.loads(out)["generation"]["token_ids"] == want[0, enc["input_ids"].shape[1]:].tolist()


def test_reshard_refuses_another_models_plan(tmp_path, capsys):
    """A plan made for a model with as many blocks but another config is refused, in one line."""
    plan_mod = pytest.importorskip("vramancer.plan.plan")
    if not hasattr(plan_mod, "config_sha256"):
        pytest.skip("plans without model identities")
    from ..runtime.conftest import make_plan

    qwen, llama = tmp_path / "qwen2", tmp_path / "llama"
    build_model("qwen2").save_pretrained(qwen)
    build_model("llama").save_pretrained(llama)
    plan_file = tmp_path / "plan.json"
    make_plan(str(qwen), 2).save(plan_file)
    capsys.readouterr()
    assert cli(["convert", str(llama), str(tmp_path / "out"), "--plan", str(plan_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another model" in err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
