"""KV caches: the running batch's, rows with masked slots in preallocated buffers (session_cache.py keeps the recent
sessions' caches between turns).

A cache is a list of (keys, values) per layer, each shaped [batch, kv_heads, slots, head_dim], as transformers'
DynamicCache holds them. Batch caches let rows have holes: a slot whose mask is 0 holds no token of that row (left
padding, the gap between a reused prefix and the new tokens of a shorter prompt, slots written before a longer row
joined). Positions are passed to the model explicitly, so a hole costs memory and attention work but never changes
a row's result. A prefill runs in a SlotBatch of the joining rows, which becomes or joins the running batch.

A compiled decode step (compiled.py) sees the batch through `SlotBatch.step_cache`: layers whose keys and values
are set, before the call, to views of the buffers ending in the step's new slot, so that the traced graph holds
no Python-side positions to specialize on: only tensors, whose sizes may change from step to step.

This is the one module that reaches into transformers' cache internals (`transformers.cache_utils`: a DynamicLayer
subclass writing into our buffers, a Cache built from such layers). Those are not a public API, so pyproject.toml
pins transformers to the minor version this was tested with, and LocalEngine refuses to start on another one
(loading.check_transformers_version).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def cache_layers(cache: DynamicCache) -> Layers:
    layers: Layers = []
    for layer in cache.layers:
        # A LLaMA-like model's cache, after a forward pass: every layer holds keys and values (no linear-attention
        # or dummy layers).
        if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
            raise TypeError(f"cache layer {type(layer).__name__} holds no keys and values")
        layers.append((layer.keys, layer.values))
    return layers


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


class _SlotLayer(DynamicLayer):
    """One layer of a SlotBatch, seen by the model as a cache: writes go into the batch's buffers in place."""

    def __init__(self, batch: SlotBatch, index: int) -> None:
        super().__init__()
        self._batch = batch
        self._index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = self._batch
        end = b.end + key_states.shape[-2]
        keys, values = b.keys[self._index], b.values[self._index]
        keys[b.lo : b.hi, :, b.end : end] = key_states
        values[b.lo : b.hi, :, b.end : end] = value_states
        self.keys = keys[b.lo : b.hi, :, b.start : end]
        self.values = values[b.lo : b.hi, :, b.start : end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._batch.end - self._batch.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class _StepLayer(CacheLayerMixin):
    """One layer of a SlotBatch for a compiled decode step: `keys` and `values` are views of the batch's buffers
    over the step's rows and slots, the last slot the new token's (SlotBatch.step_cache sets them). The new keys and
    values are written into that slot in place; decode only, one token per row."""

    is_compileable = True
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None  # set by step_cache before every call
        new = key_states.shape[-2]
        first = self.keys.shape[-2] - new
        self.keys.narrow(-2, first, new).copy_(key_states)
        self.values.narrow(-2, first, new).copy_(value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        assert self.keys is not None
        return self.keys.shape[-2] - 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class SlotBatch:
    """The running batch's cache in preallocated buffers, so a decode step writes one slot instead of copying.

    Buffers are [rows, kv_heads, slots, head_dim] per layer. Every row writes its next token at slot `end`; a row's
    earlier tokens sit in [start, end) in order, `mask[row, slot]` 1 where that row has a token (holes: left padding,
    or slots written before a longer row joined). Positions go to the model explicitly, so a hole costs attention
    work, never a different result. A row that leaves is swap-removed (one row copied); the buffers grow by half again
    and are compacted (holes squeezed out) only when full, so copies are amortized over many steps.
    """

    def __init__(self, like: Layers) -> None:
        k0 = like[0][0]
        self._init(len(like), k0.shape[1], k0.shape[3], k0.dtype, k0.device)

    @classmethod
    def for_model(cls, config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> SlotBatch:
        """An empty batch shaped for a LLaMA-like model's cache."""
        batch = cls.__new__(cls)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        batch._init(config.num_hidden_layers, heads, dim, dtype, device)
        return batch

    def _init(self, layers: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self._heads, self._dim = heads, dim
        self._dtype, self._device = dtype, device
        self._layers = layers
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self._device)
        self.rows = 0
        self.start = 0
        self.end = 0
        self.lo = self.hi = 0  # the rows a forward call through `cache` runs (step_mask, select)
        self.cache = Cache(layers=[_SlotLayer(self, i) for i in range(self._layers)])
        self._step_layers = [_StepLayer() for _ in range(self._layers)]
        self._step_cache = Cache(layers=list(self._step_layers))

    def select(self, lo: int, hi: int) -> Cache:
        """The cache as the rows [lo, hi) see it, for a forward call over only those rows (an out-of-memory split)."""
        self.lo, self.hi = lo, hi
        return self.cache

    def step_cache(self, lo: int, hi: int, new: int = 1) -> Cache:
        """The cache of a decode step over rows [lo, hi) for a compiled forward call (after step_mask): each layer's
        views end in the slot the step writes. They stay set until the next call, or until a compaction replaces the
        buffers they look at."""
        span = slice(self.start, self.end + new)
        for layer, keys, values in zip(self._step_layers, self.keys, self.values, strict=True):
            layer.keys, layer.values = keys[lo:hi, :, span], values[lo:hi, :, span]
        return self._step_cache

    def step_views(self) -> list[torch.Tensor]:
        """The keys and values views that step_cache set last, layer by layer."""
        return [t for layer in self._step_layers for t in (layer.keys, layer.values) if t is not None]

    def step_mask(self, spare: int = 0) -> torch.Tensor:
        """Make room for one more slot in every row (and `spare` more), marked used; the running rows' mask
        including it.

        `cache` then runs every row, until select() narrows it. A compiled step asks for a spare slot: its views
        then never fill the buffers, and a view that did would be contiguous, for which torch compiles a graph of
        its own (it specializes on strides)."""
        self._reserve(self.rows, self.end + 1 + spare)
        self.lo, self.hi = 0, self.rows
        self.mask[: self.rows, self.end] = 1
        return self.mask[: self.rows, self.start : self.end + 1]

    def prefill_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Make room for `new_mask.shape[1]` more slots in every row, marked as `new_mask` says (a prefill of new
        tokens right-aligned at `end`); the rows' mask including them. `cache` then runs every row."""
        width = new_mask.shape[1]
        self._reserve(self.rows, self.end + width)
        self.lo, self.hi = 0, self.rows
        self.mask[: self.rows, self.end : self.end + width] = new_mask
        return self.mask[: self.rows, self.start : self.end + width]

    def reserve(self, rows: int, slots: int) -> None:
        """Room for `rows` rows of `slots` slots from `start` without growing (a prefill's and its decode's)."""
        cap_rows, cap_slots = self.mask.shape
        if rows > cap_rows or self.start + slots > cap_slots:
            # Exactly: a prefill knows how far its rows go, and growing by half again would zero slots never used.
            self._compact(max(rows, cap_rows), max(slots, cap_slots))

    def skip(self, slots: int) -> None:
        """Leave `slots` slots empty in every row, before the tokens written next."""
        if slots:
            self.prefill_mask(torch.zeros((self.rows, slots), dtype=torch.long, device=self._device))
            self.advance(slots)

    def advance(self, tokens: int) -> None:
        """The model wrote `tokens` slots at `end` in every layer: move past them."""
        self.end += tokens

    def add(self, rows: Sequence[Layers | None]) -> None:
        """Append rows, each a compact batch-1 cache (None: empty), right-aligned at `end` (which moves right if one
        is longer)."""
        lengths = [0 if r is None else r[0][0].shape[-2] for r in rows]
        end = max(self.end, self.start + max(lengths))
        # Existing rows get a hole before their next token instead of a copy.
        self._reserve(self.rows + len(rows), end)
        end = max(self.end, self.start + max(lengths))  # _reserve may have compacted
        self.mask[: self.rows, self.end : end] = 0
        self.end = end
        for offset, (layers, n) in enumerate(zip(rows, lengths, strict=True)):
            row = self.rows + offset
            for i, (k, v) in enumerate(layers or ()):
                self.keys[i][row, :, end - n : end] = k[0]
                self.values[i][row, :, end - n : end] = v[0]
            self.mask[row, self.start : end] = 0
            self.mask[row, end - n : end] = 1
        self.rows += len(rows)

    def row_layers(self, row: int) -> Layers:
        """One row's tokens as a compact cache of batch 1 (a copy: the row is removed next)."""
        slots = self.mask[row, self.start : self.end].nonzero().squeeze(-1) + self.start
        return [
            (k[row : row + 1].index_select(-2, slots), v[row : row + 1].index_select(-2, slots))
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    def remove(self, row: int) -> None:
        """Drop a row; the last row moves into its place (callers reorder their rows the same way)."""
        last = self.rows - 1
        span = slice(self.start, self.end)
        if row != last:
            for t in (*self.keys, *self.values):
                t[row, :, span] = t[last, :, span]
            self.mask[row, span] = self.mask[last, span]
        self.mask[last, span] = 0
        self.rows = last
        if self.rows == 0:
            self.start = self.end = 0
            return
        # Leading slots no remaining row uses: skip them rather than attend over them.
        used = self.mask[: self.rows, span].any(0).nonzero()
        self.start += int(used[0]) if used.numel() else 0

    def _reserve(self, rows: int, end: int) -> None:
        cap_rows, cap_slots = self.mask.shape
        if rows <= cap_rows and end <= cap_slots:
            return
        needed = end - self.start
        # Grow by half again; a buffer full of holes and skipped slots is compacted within its own size.
        slots = cap_slots if needed <= cap_slots // 2 else max(needed + needed // 2, 64)
        self._compact(cap_rows if rows <= cap_rows else max(rows, 2 * cap_rows), slots)

    def _compact(self, cap_rows: int, cap_slots: int) -> None:
        """Move every row into new buffers of the given capacity, holes squeezed out, rows right-aligned."""
        old_keys, old_values, old_mask = self.keys, self.values, self.mask
        lengths = old_mask[: self.rows, self.start : self.end].sum(1).tolist()
        width = max(lengths, default=0)
        shape = (cap_rows, self._heads, cap_slots, self._dim)
        # Zeros, not empty: a masked slot's value is multiplied by a zero weight, and garbage could be NaN.
        keys = [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self._layers)]
        values = [torch.zeros(shape, dtype=self._dtype, device=self._device) for _ in range(self._layers)]
        mask = torch.zeros((cap_rows, cap_slots), dtype=torch.long, device=self._device)
        for row, length in enumerate(lengths):
            slots = old_mask[row, self.start : self.end].nonzero().squeeze(-1) + self.start
            for new, old in zip((*keys, *values), (*old_keys, *old_values), strict=True):
                new[row, :, width - length : width] = old[row].index_select(-2, slots)
            mask[row, width - length : width] = 1
        # Swapped in only once all is allocated: running out of memory above leaves the batch as it was.
        self.keys, self.values, self.mask = keys, values, mask
        for layer in self._step_layers:  # they would keep the old buffers alive
            layer.keys = layer.values = None
        self.start, self.end = 0, width
