"""Per-request sampling: greedy, or temperature + top-p with the request's own RNG.

Each request carries its own ``torch.Generator`` seeded from ``seed``, so a seeded request
draws the same tokens whether it runs alone or beside others in a batch. The logit warpers
are transformers' own (``TemperatureLogitsWarper``, ``TopPLogitsWarper``). ``serve`` samples with it
(serve/sampling.py re-exports it), so does ``run --cluster``'s driver (cluster/pipeline.py), and so do
``run`` / ``chat`` (runtime/generate.py hands it to ``model.generate`` as a logits processor): one
sampler for all, here below their layers; the same seed draws the same tokens in each.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SamplingParams", "Sampler", "sample_rows", "eos_id_set"]


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens: tokens to generate at most; temperature 0 = greedy; stop: strings that end
    the text (not included); ignore_eos: keep going past end-of-sequence tokens."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Sampler:
    params: SamplingParams
    _generator: Any = None
    _warpers: list = field(default_factory=list)

    def _setup(self, device: Any) -> None:
        import torch
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(int(seed) % 2**64)
        self._warpers = [TemperatureLogitsWarper(self.params.temperature)]
        if self.params.top_p < 1.0:
            self._warpers.append(TopPLogitsWarper(self.params.top_p))

    def sample(self, logits: Any) -> int:
        """logits [V] float32 -> one token id, drawn from this request's generator."""
        import torch

        if self._generator is None:
            self._setup(logits.device)
        scores = logits[None]
        for warp in self._warpers:
            scores = warp(None, scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator)[0, 0])


def sample_rows(logits: Any, samplers: list[Sampler]) -> list[int]:
    """logits [B, V] -> one token per row: one argmax for the greedy rows, each other row from
    its own sampler."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1).tolist()
    return [greedy[i] if s.params.greedy else s.sample(logits[i]) for i, s in enumerate(samplers)]


def eos_id_set(*sources: Any) -> frozenset[int]:
    """The token ids that end a sequence, from each of ``sources`` (a generation config's, a model
    config's, a tokenizer's ``eos_token_id``: an int, a list or tuple of ints, or None)."""
    ids: set[int] = set()
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return frozenset(ids)
