"""Checkpoints as they are published, not as ``save_pretrained`` wrote them a minute ago: legacy
buffers (``position_ids``, GPT-2's ``attn.bias`` / ``masked_bias``), base-model prefixes that differ
from the class's (``bert.``, no ``transformer.``, no ``model.``), shards with a hand-written index,
HF-cache snapshots whose files are symlinks into ``blobs/``, a stored dtype other than the one asked
for, and ``pytorch_model.bin``-only folders. Each is built here in the exact published layout; the
split model must give what ``from_pretrained`` of the same folder gives, and the profile must count
exactly the bytes of the model's own parameters."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from .conftest import VOCAB, build_model, make_plan

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

NEW_TOKENS = 12


def _ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, VOCAB, (1, 7), generator=g)


def _write(model, folder: Path, rename=lambda k: k, extra: dict | None = None, drop=(), dtype=None) -> Path:
    """config.json + model.safetensors with keys renamed / dropped / added, as an old repo has them."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    sd = {}
    for k, v in model.state_dict().items():
        if k in drop:
            continue
        t = v.detach().clone().contiguous()
        sd[rename(k)] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    sd.update(extra or {})
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _keys(path: Path) -> set[str]:
    raw = path.read_bytes()
    return set(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]))


def _param_bytes(model, dtype=None) -> int:
    size = (lambda p: p.element_size()) if dtype is None else (lambda p: torch.empty((), dtype=dtype).element_size())
    return sum(p.numel() * size(p) for p in model.parameters())  # parameters() de-duplicates tied ones


def _greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False)


def _split(target, n_stages=2, dtype=None):
    from vramancer.runtime.loader import load

    plan = make_plan(target if isinstance(target, str) else str(target), n_stages, dtype=dtype)
    return load(target if isinstance(target, str) else str(target), plan=plan), plan


def _check_causal(folder, cls, model_ref=None, dtype=None):
    """Split greedy ids == from_pretrained's; last-step logits equal."""
    kw = {"dtype": dtype} if dtype is not None else {}
    ref = getattr(transformers, cls).from_pretrained(folder, **kw).eval()
    ids = _ids()
    want = _greedy(ref, ids)
    model, plan = _split(model_ref or folder, dtype=str(dtype).replace("torch.", "") if dtype is not None else None)
    try:
        got = _greedy(model, ids)
        assert torch.equal(got, want)
        with torch.no_grad():
            a = model(want).logits
            b = ref(want).logits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    finally:
        model.vramancer.detach()
    return ref, plan


def test_gpt2_original_layout_with_mask_buffers(tmp_path):
    """GPT-2 as first published: no ``transformer.`` prefix, no stored LM head (tied), and the
    causal-mask buffers ``h.N.attn.bias`` / ``h.N.attn.masked_bias`` in the file."""
    import vramancer

    src = build_model("gpt2")
    n = src.config.n_positions
    extra = {}
    for i in range(src.config.n_layer):
        extra[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        extra[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    folder = _write(src, tmp_path / "gpt2", rename=lambda k: k.removeprefix("transformer."),
                    extra=extra, drop={"lm_head.weight"})
    keys = _keys(folder / "model.safetensors")
    assert "h.0.attn.masked_bias" in keys and "wte.weight" in keys and "lm_head.weight" not in keys
    ref, _ = _check_causal(folder, "GPT2LMHeadModel")
    prof = vramancer.profile(str(folder))
    assert prof.weights_bytes == _param_bytes(ref)
    assert any("not weights of the model" in note and "masked_bias" in note for note in prof.notes)


def test_bert_with_prefix_and_position_ids(tmp_path):
    """A BertModel loaded from a checkpoint saved with the ``bert.`` prefix (as BertForPreTraining
    repos are) with TF-era ``LayerNorm.gamma`` / ``beta`` names, the once-persistent ``position_ids``
    buffer and a head BertModel has not:
    loaded as from_pretrained loads it, the head left unread and not counted."""
    import vramancer

    src = build_model("bert")
    n = src.config.max_position_embeddings
    old_names = lambda k: "bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(  # noqa: E731
        "LayerNorm.bias", "LayerNorm.beta")  # TF-era names transformers still renames
    folder = _write(src, tmp_path / "bert", rename=old_names,
                    extra={"bert.embeddings.position_ids": torch.arange(n).view(1, n),
                           "cls.predictions.bias": torch.zeros(VOCAB)})  # the pre-training head BertModel drops
    ref = transformers.BertModel.from_pretrained(folder).eval()
    ids = _ids()
    model, _ = _split(folder)
    try:
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            want = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        model.vramancer.detach()
    assert vramancer.profile(str(folder)).weights_bytes == _param_bytes(ref)


def test_llama_without_model_prefix(tmp_path):
    """A causal-LM checkpoint whose base-model keys lack ``model.`` (``layers.0...``, ``embed_tokens``)
    next to an untied ``lm_head.weight``: transformers adds the base-model prefix."""
    import vramancer

    src = build_model("llama")
    assert not src.config.tie_word_embeddings
    folder = _write(src, tmp_path / "llama", rename=lambda k: k.removeprefix("model."),
                    extra={f"layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(4)})
    assert "layers.0.self_attn.q_proj.weight" in _keys(folder / "model.safetensors")
    ref, _ = _check_causal(folder, "LlamaForCausalLM")
    assert vramancer.profile(str(folder)).weights_bytes == _param_bytes(ref)


def _shard_by_hand(src_folder: Path, dst: Path, per_shard: int) -> dict:
    """model-0000i-of-0000n.safetensors + model.safetensors.index.json, as published repos have them."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True)
    (dst / "config.json").write_text((src_folder / "config.json").read_text())
    tensors = load_file(src_folder / "model.safetensors")
    names = sorted(tensors)
    chunks = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map, total = {}, 0
    for i, chunk in enumerate(chunks):
        fname = f"model-{i + 1:05d}-of-{len(chunks):05d}.safetensors"
        save_file({k: tensors[k] for k in chunk}, dst / fname, metadata={"format": "pt"})
        for k in chunk:
            weight_map[k] = fname
            total += tensors[k].numel() * tensors[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index


def test_sharded_with_index(tmp_path):
    import vramancer

    src = build_model("qwen2")
    plain = _write(src, tmp_path / "plain")
    folder = tmp_path / "sharded"
    index = _shard_by_hand(plain, folder, per_shard=7)
    assert len(set(index["weight_map"].values())) >= 4 and not (folder / "model.safetensors").exists()
    ref, _ = _check_causal(folder, "Qwen2ForCausalLM")
    assert vramancer.profile(str(folder)).weights_bytes == _param_bytes(ref)


def _cache_tree(folder: Path, cache: Path, repo_id: str) -> tuple[Path, str]:
    """An HF-cache repo as huggingface_hub lays it out: blobs named by their hash, snapshot files
    that are relative symlinks into blobs/, refs/main holding the commit."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snap = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), snap / f.name)
    return snap, commit


def test_hf_cache_snapshot_by_id(tmp_path, monkeypatch):
    """``org/name`` resolved from $HF_HUB_CACHE (read at call time) to a snapshot of symlinks into
    blobs/, sharded, and loaded by id."""
    import vramancer

    src = build_model("mistral")
    plain = _write(src, tmp_path / "plain")
    sharded = tmp_path / "sharded"
    _shard_by_hand(plain, sharded, per_shard=9)
    cache = tmp_path / "hf" / "hub"
    snap, commit = _cache_tree(sharded, cache, "tiny-org/tiny-mistral")
    assert all(p.is_symlink() for p in snap.iterdir())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    prof = vramancer.profile("tiny-org/tiny-mistral")
    assert Path(prof.path) == snap and prof.source == "hf-cache"
    assert vramancer.profile(f"tiny-org/tiny-mistral@{commit}").weights_bytes == prof.weights_bytes
    ref, _ = _check_causal(snap, "MistralForCausalLM", model_ref="tiny-org/tiny-mistral")
    assert prof.weights_bytes == _param_bytes(ref)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    from vramancer.errors import UnknownModelError

    with pytest.raises(UnknownModelError):
        vramancer.profile("tiny-org/tiny-mistral")


@pytest.mark.parametrize("stored, asked", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_checkpoint_dtype_other_than_requested(tmp_path, stored, asked):
    """An fp32 file loaded as bf16 and a bf16 file loaded as fp32: outputs equal from_pretrained's
    in the asked dtype, and the plan's bytes are the asked dtype's."""
    import vramancer

    src = build_model("llama")
    folder = _write(src, tmp_path / "m", dtype=stored)
    name = str(asked).replace("torch.", "")
    ref, plan = _check_causal(folder, "LlamaForCausalLM", dtype=asked)
    assert next(ref.parameters()).dtype == asked
    prof = vramancer.profile(str(folder), dtype=name)
    assert prof.weights_bytes == _param_bytes(ref) == _param_bytes(src, asked)
    assert not src.config.tie_word_embeddings
    assert sum(b.weights_bytes for b in plan.blocks) == prof.weights_bytes
    assert plan.workload.dtype == name


def test_pickle_only_folder_is_refused_with_the_command(tmp_path, capsys, monkeypatch):
    from vramancer.cli import main

    src = build_model("llama")
    folder = tmp_path / "old-llama"
    folder.mkdir()
    src.config.save_pretrained(folder)
    torch.save(src.state_dict(), folder / "pytorch_model.bin")
    code = main(["run", str(folder), "--prompt", "hi", "--devices", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert f"vramancer convert {folder} old-llama-safetensors" in err
    from vramancer.errors import BadInputError
    from vramancer.runtime.checkpoint import Checkpoint

    with pytest.raises(BadInputError, match="vramancer convert"):
        Checkpoint(folder)
    cache = tmp_path / "hub"                                  # the same repo in the HF cache, run by id
    _cache_tree(folder, cache, "old-org/old-llama")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # found locally: the Hub is never asked
    assert main(["run", "old-org/old-llama", "--prompt", "hi", "--devices", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vramancer convert old-org/old-llama old-llama-safetensors" in err
    monkeypatch.chdir(tmp_path)                               # the command it names works as written
    command = err.split("convert them once with: ")[1].split()
    assert command[:2] == ["vramancer", "convert"] and main(command[1:]) == 0
    converted = tmp_path / "old-llama-safetensors"
    ref = transformers.LlamaForCausalLM.from_pretrained(folder).eval()   # transformers reading the pickle
    model, _ = _split(converted)
    try:
        assert torch.equal(_greedy(model, _ids()), _greedy(ref, _ids()))
    finally:
        model.vramancer.detach()
