"""What several benchmarks share: a seeded Llama with random weights spread wider than the default
init (next-token distributions worth comparing between formats), and running with a torch thread
count that is given back afterwards (a smoke test imports the script into a test process)."""
from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["make_llama", "with_threads", "saved_llama_main"]

T = TypeVar("T")


def make_llama(hidden: int, layers: int, vocab: int, inter: int | None = None, seed: int = 0,
               max_positions: int = 1024) -> Any:
    """A LlamaForCausalLM in eval mode: heads of 64 values, a KV head per 4 query heads (at least 1),
    matrices drawn from N(0, 0.05)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter or hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 256), max_position_embeddings=max_positions,
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


def saved_llama_main(argv: list[str] | None, description: str, rows: Callable[..., list[dict]], key: str,
                     new_default: int) -> int:
    """The command line of a benchmark that measures ``rows(folder, new=N)`` on a ``make_llama``
    model saved with ``save_pretrained``: --hidden --layers --vocab --new --threads --json."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--hidden", type=int, default=512, help="hidden size (heads of 64 values)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--new", type=int, default=new_default, help="greedy tokens timed")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    def run() -> int:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        model = make_llama(args.hidden, args.layers, args.vocab)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            out = rows(tmp, new=args.new)
        if args.json:
            Path(args.json).write_text(json.dumps({key: out}, indent=2))
        return 0

    return with_threads(args.threads, run)
