"""Per-request sampling: greedy, or temperature + top-p with the request's own RNG.

The sampler lives in vramancer/runtime/sampling.py (``run --cluster``'s driver samples with it too);
serve's modules import it from here.
"""
from __future__ import annotations

from ..runtime.sampling import Sampler, SamplingParams, sample_rows

__all__ = ["SamplingParams", "Sampler", "sample_rows"]
