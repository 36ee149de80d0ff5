"""The KV caches of recent sessions, and of a few recent prompts shared by all requests, within one memory budget.

Entries are compact batch-1 caches (kv_store.Layers) handed over by the model runner when a row leaves the batch;
nothing here touches transformers' cache classes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from bot.engine.local.kv_store import Layers, common_prefix, layers_nbytes

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    layers: Layers
    nbytes: int


# A shared prefix is used only when it covers at least this many tokens: below it a lookup saves next to nothing.
MIN_SHARED_TOKENS = 16
# Recent prompts kept as shared prefixes (their common heads, such as a system prompt, are prefilled once).
MAX_SHARED_PREFIXES = 8
_SHARED = "\0shared:"  # key prefix of shared entries; no session id starts with a NUL


class SessionKVCache:
    """The KV caches of recent sessions, and of a few recent prompts shared by all requests (vLLM's prefix caching
    in small), within one memory budget, least recently used evicted first.

    Used by the worker thread only. A session's entry leaves the store while its next turn runs (that turn owns
    the cache and hands back the longer one when it ends), so one cache is never shared by two requests; a shared
    entry is only read (a prefill copies what it reuses), never written.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._shared: list[str] = []  # keys of shared entries, oldest first
        self._nbytes = 0
        self._next_shared = 0

    def __len__(self) -> int:
        """Sessions stored (shared prefixes not counted)."""
        return len(self._entries) - len(self._shared)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def reusable(self, session_id: str | None, prompt: Sequence[int]) -> int:
        """How many leading tokens of `prompt` a cache holds (always leaving one to feed)."""
        return max(self.owned(session_id, prompt), self._best_shared(prompt)[0])

    def owned(self, session_id: str | None, prompt: Sequence[int]) -> int:
        """How many leading tokens of `prompt` the session's own cache holds (always leaving one to feed)."""
        entry = self._entries.get(session_id) if session_id is not None else None
        if entry is None:
            return 0
        return min(common_prefix(entry.tokens, prompt), len(prompt) - 1)

    def take(self, session_id: str | None, prompt: Sequence[int]) -> Layers | None:
        """Remove the session's cache; return the longest cached part that `prompt` extends (None if none)."""
        own = self.owned(session_id, prompt)
        shared, key = self._best_shared(prompt)
        entry = self._pop(session_id)
        if key is not None and shared > own:
            entry, n = self._entries[key], shared
            self._entries.move_to_end(key)
        elif entry is not None and own > 0:
            n = own
        else:
            if entry is not None:
                log.debug("session %s: prompt does not extend its cached %d tokens", session_id, len(entry.tokens))
            return None
        # Tokens past the common prefix are a different continuation (the last generated token was never fed,
        # a re-encoded answer may split differently, trimmed history starts elsewhere): crop them.
        return [(k[..., :n, :], v[..., :n, :]) for k, v in entry.layers]

    def put(self, session_id: str, tokens: Sequence[int], layers: Layers) -> None:
        self._pop(session_id)
        self._store(session_id, tokens, layers)

    def share(self, tokens: Sequence[int], layers: Layers) -> None:
        """Keep a prompt's cache for any request that starts the same way, unless one already covers it."""
        if len(tokens) < MIN_SHARED_TOKENS or self._best_shared(tokens, leave=0)[0] >= len(tokens):
            return
        key = f"{_SHARED}{self._next_shared}"
        self._next_shared += 1
        if self._store(key, tokens, layers):
            self._shared.append(key)
            while len(self._shared) > MAX_SHARED_PREFIXES:
                self._pop(self._shared[0])

    def _best_shared(self, prompt: Sequence[int], leave: int = 1) -> tuple[int, str | None]:
        best, best_key = 0, None
        for key in self._shared:
            n = min(common_prefix(self._entries[key].tokens, prompt), len(prompt) - leave)
            if n > best:
                best, best_key = n, key
        return (best, best_key) if best >= MIN_SHARED_TOKENS else (0, None)

    def _store(self, key: str, tokens: Sequence[int], layers: Layers) -> bool:
        nbytes = layers_nbytes(layers)
        if nbytes > self.budget_bytes:
            return False
        self._entries[key] = _Entry(tuple(tokens), layers, nbytes)
        self._nbytes += nbytes
        while self._nbytes > self.budget_bytes:
            evicted = next(iter(self._entries))
            entry = self._pop(evicted)
            assert entry is not None
            log.debug("%r: KV cache of %d tokens evicted", evicted, len(entry.tokens))
        return True

    def _pop(self, key: str | None) -> _Entry | None:
        if key is None:
            return None
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._nbytes -= entry.nbytes
            if key.startswith(_SHARED):
                self._shared.remove(key)
        return entry
