"""KV caches: the running batch's (rows with masked slots) and the recent sessions' (LRU within a memory budget).

A cache is a list of (keys, values) per layer, each shaped [batch, kv_heads, slots, head_dim], as transformers'
DynamicCache holds them. The batch cache lets rows have holes: a slot whose mask is 0 holds no token of that row
(left padding, or the gap between a reused prefix and the new tokens of a shorter prompt). Positions are passed to
the model explicitly, so a hole costs memory and attention work but never changes a row's result.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def cache_layers(cache: DynamicCache) -> Layers:
    return [(layer.keys, layer.values) for layer in cache.layers]


def make_cache(config: PretrainedConfig, layers: Layers | None = None) -> DynamicCache:
    cache = DynamicCache(config=config)
    for i, (keys, values) in enumerate(layers or ()):
        cache.update(keys, values, i)
    return cache


def layers_nbytes(layers: Layers) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _pad_slots(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad the slot dimension (-2) to `width`."""
    return F.pad(t, (0, 0, width - t.shape[-2], 0)) if t.shape[-2] < width else t


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(mask, (width - mask.shape[-1], 0)) if mask.shape[-1] < width else mask


@dataclass
class BatchKV:
    """The running batch's cache; `mask[row, slot]` is 1 where that row has a token."""

    cache: DynamicCache
    mask: torch.Tensor  # long, [rows, slots]

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def row_layers(self, row: int) -> Layers:
        """One row's real slots as a compact cache of batch 1 (a copy: the batch may drop the row next)."""
        slots = self.mask[row].nonzero().squeeze(-1)
        return [
            (k[row : row + 1].index_select(-2, slots), v[row : row + 1].index_select(-2, slots))
            for k, v in cache_layers(self.cache)
        ]

    def keep(self, rows: Sequence[int], config: PretrainedConfig) -> BatchKV | None:
        """The batch of the given rows only, without the leading slots none of them uses; None when empty."""
        if not rows:
            return None
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else mask.shape[1]
        layers = [
            (k.index_select(0, index)[..., first:, :], v.index_select(0, index)[..., first:, :])
            for k, v in cache_layers(self.cache)
        ]
        return BatchKV(make_cache(config, layers), mask[:, first:])

    def merge(self, other: BatchKV, config: PretrainedConfig) -> BatchKV:
        """Both batches as one: the narrower is left-padded to the wider's slots."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        layers = [
            (
                torch.cat([_pad_slots(k1, width), _pad_slots(k2, width)]),
                torch.cat([_pad_slots(v1, width), _pad_slots(v2, width)]),
            )
            for (k1, v1), (k2, v2) in zip(cache_layers(self.cache), cache_layers(other.cache), strict=True)
        ]
        mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(other.mask, width)])
        return BatchKV(make_cache(config, layers), mask)


def stack_prefixes(prefixes: Sequence[Layers | None], device: torch.device) -> tuple[Layers | None, torch.Tensor]:
    """Batch-1 caches of different lengths (or none) as one left-padded batch cache and its slot mask."""
    lengths = [0 if p is None else p[0][0].shape[-2] for p in prefixes]
    width = max(lengths)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long, device=device)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    if width == 0:
        return None, mask
    model = next(p for p in prefixes if p is not None)
    layers: Layers = []
    for i, (k0, v0) in enumerate(model):
        empty_k = k0.new_zeros((1, k0.shape[1], width, k0.shape[3]))
        empty_v = v0.new_zeros((1, v0.shape[1], width, v0.shape[3]))
        keys = [empty_k if p is None else _pad_slots(p[i][0], width) for p in prefixes]
        values = [empty_v if p is None else _pad_slots(p[i][1], width) for p in prefixes]
        layers.append((torch.cat(keys), torch.cat(values)))
    return layers, mask


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    layers: Layers
    nbytes: int


class SessionKVCache:
    """The KV caches of recent sessions within a memory budget, least recently used evicted first.

    Used by the worker thread only. A session's entry leaves the store while its next turn runs (that turn owns
    the cache and hands back the longer one when it ends), so one cache is never shared by two requests.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def reusable(self, session_id: str | None, prompt: Sequence[int]) -> int:
        """How many leading tokens of `prompt` the session's cache holds (always leaving one to feed)."""
        entry = self._entries.get(session_id) if session_id is not None else None
        if entry is None:
            return 0
        return min(common_prefix(entry.tokens, prompt), len(prompt) - 1)

    def take(self, session_id: str | None, prompt: Sequence[int]) -> Layers | None:
        """Remove the session's cache; return its part that `prompt` extends (None if no token matches)."""
        n = self.reusable(session_id, prompt)
        entry = self._pop(session_id)
        if entry is None:
            return None
        if n == 0:
            log.debug("session %s: prompt does not extend its cached %d tokens; dropped", session_id, len(entry.tokens))
            return None
        # Tokens past the common prefix are a different continuation (the last generated token was never fed,
        # a re-encoded answer may split differently, trimmed history starts elsewhere): crop them.
        return [(k[..., :n, :], v[..., :n, :]) for k, v in entry.layers]

    def put(self, session_id: str, tokens: Sequence[int], layers: Layers) -> None:
        self._pop(session_id)
        nbytes = layers_nbytes(layers)
        if nbytes > self.budget_bytes:
            return
        self._entries[session_id] = _Entry(tuple(tokens), layers, nbytes)
        self._nbytes += nbytes
        while self._nbytes > self.budget_bytes:
            evicted, entry = self._entries.popitem(last=False)
            self._nbytes -= entry.nbytes
            log.debug("session %s: KV cache of %d tokens evicted", evicted, len(entry.tokens))

    def clear(self) -> None:
        self._entries.clear()
        self._nbytes = 0

    def _pop(self, session_id: str | None) -> _Entry | None:
        if session_id is None:
            return None
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self._nbytes -= entry.nbytes
        return entry
