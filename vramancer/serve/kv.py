"""The running batch's KV cache, and where its bytes live (per pipeline stage).

``BatchKV`` keeps one transformers ``DynamicCache`` for all running sequences, rows
left-padded to a common width W (rows are right-aligned: every row's newest token is in
the last column), with a ``mask`` [B, W] that is 1 on real tokens. A sequence prefilled on
its own joins at a token boundary (padding the shorter side on the left); finished or
cancelled rows leave by row selection, and columns that became padding in every row are
trimmed, so W is always the longest running row.

``StageKV`` says which decoder layers' caches live on which stage, with the KV budget the
plan reserved there and the bytes one token adds (measured on the real cache).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["StageKV", "BatchKV", "cache_layer_bytes", "new_cache"]


@dataclass(frozen=True)
class StageKV:
    """One pipeline stage as the KV admission sees it.

    layers: half-open range of decoder layer indices whose KV this stage holds
    budget_bytes: KV bytes the plan reserved on this stage (context x batch of the plan)
    kv_bytes_per_token: bytes one token of one sequence adds to this stage's cache (measured)
    """

    index: int
    device: str
    layers: tuple[int, int]
    budget_bytes: int
    kv_bytes_per_token: int

    def needed_bytes(self, rows: int, width_tokens: int) -> int:
        """Bytes of a padded batch cache of ``rows`` x ``width_tokens`` on this stage."""
        return rows * width_tokens * self.kv_bytes_per_token


def new_cache(kv_dtype: str | None = None):
    """An empty DynamicCache whose layers keep every token. Sliding-window layers too: their
    window is applied by the attention mask, which in a right-aligned batch is exact (column
    distance = position distance), whereas a cache that drops old columns would drop a
    different number of real tokens in each padded row. ``kv_dtype`` (the plan's --kv-dtype):
    layers that keep keys and values packed in it (runtime/kvcache.py)."""
    if kv_dtype is not None:
        from ..runtime.kvcache import new_kv_cache

        return new_kv_cache(None, kv_dtype)
    from transformers import DynamicCache

    return DynamicCache()


def _pairs(cache: Any) -> list[tuple[Any, ...]]:
    """Per layer its stored tensors, [B, H, T, ...] (None for a layer never written): keys and
    values, and a q8_0 cache's scales (runtime/kvcache.layer_tensors)."""
    from ..runtime.kvcache import layer_tensors

    return [layer_tensors(layer) for layer in cache.layers]


def cache_layer_bytes(cache: Any) -> list[int]:
    """Bytes held by each layer's keys and values (and scales)."""
    return [sum(t.numel() * t.element_size() for t in parts if t is not None) for parts in _pairs(cache)]


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, width, D], zeros on the left."""
    import torch

    missing = width - t.shape[-2]
    if missing <= 0:
        return t
    pad = torch.zeros(*t.shape[:-2], missing, t.shape[-1], dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=-2)


def _rebuild(layers: Iterator[tuple[Any, ...]], template: Any):
    """A cache of ``template``'s kind holding the given per-layer tensors (consumed one layer at a time)."""
    from ..runtime.kvcache import cache_with_tensors

    return cache_with_tensors(template, layers)


class BatchKV:
    """One batched cache for the running rows. Not thread-safe: the scheduler thread owns it."""

    def __init__(self) -> None:
        self.cache: Any = None       # DynamicCache, layers [B, H, W_layer, D]
        self.mask: Any = None        # [B, W] int64, 1 = real token
        self.lengths: list[int] = []  # real tokens per row (= next position id)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def join(self, row_cache: Any, row_len: int) -> None:
        """Add a prefilled sequence (its own cache, batch 1, ``row_len`` tokens) as the last row."""
        import torch

        if self.cache is None:
            self.cache = row_cache
            self.mask = torch.ones(1, row_len, dtype=torch.long)
            self.lengths = [row_len]
            return
        old, new = _pairs(self.cache), _pairs(row_cache)
        self.cache = None

        def layers() -> Iterator[tuple[Any, ...]]:
            for i in range(len(old)):
                mine, theirs = old[i], new[i]
                old[i] = new[i] = None  # free each old layer as soon as its replacement exists
                if mine[0] is None or theirs[0] is None:
                    yield (None, None)
                    continue
                w = max(mine[0].shape[-2], theirs[0].shape[-2])
                joined = tuple(torch.cat([_pad_left(a, w), _pad_left(b.to(a.device), w)], dim=0)
                               for a, b in zip(mine, theirs, strict=True))
                del mine, theirs
                yield joined

        self.cache = _rebuild(layers(), row_cache)
        width = max(self.width, row_len)
        pad_old = torch.zeros(self.rows, width - self.width, dtype=torch.long)
        row = torch.cat([torch.zeros(width - row_len, dtype=torch.long),
                         torch.ones(row_len, dtype=torch.long)])
        self.mask = torch.cat([torch.cat([pad_old, self.mask], dim=1), row[None]], dim=0)
        self.lengths.append(row_len)

    def step(self) -> tuple[Any, Any]:
        """Mask and position ids for one decode token per row: ([B, W+1], [B, 1]).
        Call ``advance()`` after the forward that used them."""
        import torch

        mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)
        positions = torch.tensor(self.lengths, dtype=torch.long)[:, None]
        return mask, positions

    def advance(self, mask: Any) -> None:
        self.mask = mask
        self.lengths = [n + 1 for n in self.lengths]

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); drop columns that are now padding everywhere."""
        import torch

        if not rows:
            self.clear()
            return
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask[index]
        lengths = [self.lengths[r] for r in rows]
        trim = self.width - max(lengths)  # leading columns with no real token left
        old = _pairs(self.cache)
        template, self.cache = self.cache, None

        def layers() -> Iterator[tuple[Any, ...]]:
            for i in range(len(old)):
                parts = old[i]
                old[i] = None
                if parts[0] is None:
                    yield (None, None)
                    continue
                idx = index.to(parts[0].device)
                kept = tuple(t[:, :, trim:][idx] for t in parts)  # one copy: rows and columns kept
                del parts
                yield kept

        self.cache = _rebuild(layers(), template)
        self.mask = mask[:, trim:].contiguous()
        self.lengths = lengths

    def clear(self) -> None:
        self.cache = None
        self.mask = None
        self.lengths = []

    def layer_bytes(self) -> list[int]:
        return [] if self.cache is None else cache_layer_bytes(self.cache)
