"""benchmarks/moe.py's shapes keep the ratios of the published configs they stand for (what its
docstring claims): experts and top k, expert width / hidden, attention width / hidden, GQA ratio,
shared expert / hidden; the transformers model each builds has them; an unknown shape is one line,
exit 2. The published models themselves plan with experts in host RAM (predicted only)."""
from __future__ import annotations

import pytest

from tests.benchmarks.conftest import import_script

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    yield from import_script("moe", "bench_moe_shapes")


def _ratios(hidden, heads, kv_heads, head_dim, experts, top_k, moe_inter, shared):
    return (experts, top_k, moe_inter / hidden, heads * head_dim / hidden, heads / kv_heads, shared / hidden)


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "qwen1.5-moe"])
def test_shapes_keep_the_published_ratios(bench, name):
    s, c = bench.SHAPES[name], bench.PUBLISHED[name]
    mine = _ratios(s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["experts"], s["top_k"], s["moe_inter"],
                   s["shared_inter"])
    h = c["hidden_size"]
    experts = c.get("num_local_experts") or c["num_experts"]
    inter = c.get("moe_intermediate_size") or c["intermediate_size"]
    heads = c["num_attention_heads"]
    pub = _ratios(h, heads, c["num_key_value_heads"], c.get("head_dim", h // heads), experts, c["num_experts_per_tok"],
                  inter, c.get("shared_expert_intermediate_size", 0))
    assert mine == pytest.approx(pub)
    model = bench.make_model({**s, "layers": 1}, vocab=64)
    cfg = model.config
    assert cfg.model_type == s["arch"] and cfg.hidden_size == s["hidden"]
    assert cfg.num_experts_per_tok == s["top_k"]
    exp = model.model.layers[0].mlp.experts
    assert tuple(exp.gate_up_proj.shape) == (s["experts"], 2 * s["moe_inter"], s["hidden"])
    assert model.model.layers[0].self_attn.q_proj.out_features == s["heads"] * s["head_dim"]


def test_unknown_shape_is_one_line_exit_2(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.run(["--shapes", "mixtral,nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "qwen3-moe" in err[0]


def test_published_model_plans_experts_in_host_ram(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMANCER_CACHE_DIR", str(tmp_path / "cache"))
    r = bench.published_prediction("qwen1.5-moe", "rtx4090", 0.4, 544, str(tmp_path))
    assert r["experts_host_layers"] > 0 and r["whole_host_layers"] > 0
    assert 0 < r["experts_host_bytes"] < r["whole_host_bytes"]     # a shared expert and attention stay on the GPU
    assert r["ratio"] == pytest.approx(r["experts_tps"] / r["whole_tps"])
