"""One stage as a model of its own (cluster/stage.py), without Ray: chained stage by stage in this
process, greedy tokens and logits equal the single-process split's for each architecture; the
cluster's trust sets (exactly the expected peers, minus what the node revoked)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.runtime.conftest import build_model, make_plan  # noqa: E402

PROMPT = [1, 5, 9, 17, 33, 4]


def _reference(folder, plan, steps: int) -> tuple[list[int], list]:
    from transformers import DynamicCache

    from vramancer.runtime.loader import load

    model = load(str(folder), plan=plan)
    try:
        cache = DynamicCache(config=model.config)
        x, toks, logits = torch.tensor([PROMPT]), [], []
        with torch.no_grad():
            for _ in range(steps):
                lg = model(x, past_key_values=cache, use_cache=True).logits[0, -1].float()
                logits.append(lg)
                toks.append(int(lg.argmax()))
                x = torch.tensor([[toks[-1]]])
        return toks, logits
    finally:
        model.vramancer.free()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2", "phi3", "gpt2"])
def test_stages_chained_equal_the_split_model(tmp_path, arch):
    from vramancer.cluster.stage import StageModel, stage_blocks

    folder = tmp_path / arch
    build_model(arch).save_pretrained(folder, safe_serialization=True)
    plan = make_plan(folder, 3)
    stages = [StageModel.from_folder(folder, plan, i) for i in range(3)]
    assert [stage_blocks(plan, i).layers for i in range(3)] == [(0,), (1, 2), (3,)]
    want_toks, want_logits = _reference(folder, plan, 6)
    x, start, toks = torch.tensor([PROMPT]), 0, []
    for step in range(6):
        h = x
        for st in stages:
            h = st.forward(h, start)
        start += x.shape[1]
        torch.testing.assert_close(h[0], want_logits[step], rtol=1e-5, atol=1e-5)
        toks.append(int(h[0].argmax()))
        x = torch.tensor([[toks[-1]]])
    assert toks == want_toks
    # a stage only holds its own blocks' weights: stage 1 has 2 layers and no embedding or head
    mid = stages[1].model
    assert mid.config.num_hidden_layers == 2
    full = transformers.AutoConfig.from_pretrained(folder)
    if getattr(full, "layer_types", None):      # gemma2: sliding / full attention by layer, sliced with the layers
        assert list(mid.config.layer_types) == list(full.layer_types[1:3])
    assert mid.get_input_embeddings().weight.device.type == "meta"


def test_a_stage_continuing_at_the_wrong_position_is_refused(tmp_path):
    from vramancer.cluster.stage import StageModel
    from vramancer.errors import BadInputError

    folder = tmp_path / "llama"
    build_model("llama").save_pretrained(folder, safe_serialization=True)
    plan = make_plan(folder, 2)
    st = StageModel.from_folder(folder, plan, 0)
    st.forward(torch.tensor([PROMPT]), 0)
    with pytest.raises(BadInputError, match="continue at token 3, its cache holds 6"):
        st.forward(torch.tensor([[7]]), 3)


def test_cluster_trust_is_the_expected_peers_less_the_revoked(tmp_path, monkeypatch):
    from vramancer.cluster.nodes import cluster_trust
    from vramancer.link.keys import TrustStore, keys_dir

    monkeypatch.setenv("VRAMANCER_CONFIG", str(tmp_path / "config.toml"))
    a, b, c = ("aa" * 32), ("bb" * 32), ("cc" * 32)
    local = TrustStore(keys_dir() / "trust.json")
    fa, fb, fc = local.trust(a), local.revoke(b), local.trust(c)
    local.save()
    store = cluster_trust([fa, fb])
    assert store.verdict(fa) == "trusted"
    assert store.verdict(fb) == "revoked"        # revoked on this node: refused whoever vouches for it
    assert store.verdict(fc) == "unknown"        # trusted here, but not a peer of this connection
    assert not (keys_dir() / "cluster-trust.json").exists()   # kept in memory, never written
