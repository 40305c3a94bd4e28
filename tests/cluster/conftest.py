"""Shared pieces of the cluster tests: the tiny checkpoint, node identities, and the network
namespace the Ray-using tests run their processes in (tests/cluster/_netns.py: Ray needs a
non-loopback address, and the tests bind nothing outside a namespace of their own)."""
from __future__ import annotations

from pathlib import Path

import pytest

from ._ns_cluster import NODE_DEVICES, TWO_NODE_DEVICES  # noqa: F401 - re-exported for the tests

RAY_MISSING = "the cluster tests need Ray (pip install 'vramancer[cluster]')"


def make_identity(root: Path) -> str:
    from vramancer.link.keys import create_identity

    return create_identity(root / "keys").fingerprint


def make_tiny_model(folder: Path) -> Path:
    """A Llama with 6 layers (8 blocks) saved in ``folder``, random weights spread wide enough for
    decisive greedy picks."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("cluster-model") / "llama")


@pytest.fixture(scope="module")
def cluster_ns():
    """A network namespace of this module's own (deleted after it); skipped where one cannot be made."""
    from ._netns import netns, skip_reason

    why = skip_reason()
    if why:
        pytest.skip(why)
    try:
        ctx = netns("cl")
        ns = ctx.__enter__()
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        yield ns
    finally:
        ctx.__exit__(None, None, None)
