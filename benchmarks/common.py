"""What several benchmarks share: a seeded Llama with random weights spread wider than the default
init (next-token distributions worth comparing between formats), and running with a torch thread
count that is given back afterwards (a smoke test imports the script into a test process)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["make_llama", "with_threads"]

T = TypeVar("T")


def make_llama(hidden: int, layers: int, vocab: int, inter: int | None = None, seed: int = 0) -> Any:
    """A LlamaForCausalLM in eval mode: heads of 64 values, a KV head per 4 query heads (at least 1),
    matrices drawn from N(0, 0.05)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter or hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 256), max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    return model


def with_threads(threads: int | None, fn: Callable[[], T]) -> T:
    """``fn()`` with torch at ``threads`` threads (None: as it is), the count given back after."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)
