"""The model runner: requests join the running batch between decode steps and leave it when done.

Why our own step loop over `model(...)` calls instead of transformers' continuous batching (`generate_batch`,
`init_continuous_batching`) as of transformers 5.24:
- its manager applies one GenerationConfig to every request; ours samples each row with its own parameters;
- its paged cache lives and dies with the manager's requests (block sharing only spans requests in flight), while a
  chat turn should start from the previous turn's cache, checked token by token;
- on this project's CPU it measured ~4.0x one-by-one against ~4.7x for a static left-padded batch (paged attention
  on the CPU is slower than sdpa over a dense cache), and we must not lose to the static batch.
So a step here is one forward call: a prefill of the requests that join (their reused session prefixes stacked into
a DynamicCache), or one decode token for every running row over the batch's preallocated SlotBatch, which takes each
step's keys and values in place (a DynamicCache would copy the whole batch's cache every step).

Out of GPU memory (torch.OutOfMemoryError) in a forward call, the rows of that call are split in halves that run
one after the other, recursively down to one row, with the allocator's cached blocks freed between tries; a row that
runs out of memory alone fails with ModelOutOfMemoryError and the others go on. Splitting the call in place, rather than
evicting rows to the waiting queue, keeps every row's KV where it is: nothing is copied or prefilled again (an
eviction would need memory for the copy, or recompute the whole context), and a row's tokens are the ones it would
have got in the full batch. Memory the split saves is the forward's own (activations, attention over the slots,
logits), which grows with the rows of a call; the KV buffers themselves are already allocated. A prefill splits the
joining group; a decode step splits the running rows over the SlotBatch (SlotBatch.select) and keeps running in
chunks of the size that fitted, trying twice that again after a while, as memory may have been freed meanwhile.

With `[model] compile = "decode"`, a decode step goes through the compiled forward (compiled.py) over the batch's
step views (SlotBatch.step_cache); with `"all"`, the joining rows' prefill too (except the one-off prefill of a
shared head, which runs eagerly); the eager forward is the fallback when compiling is off or failed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from bot.engine.base import EngineStats
from bot.engine.local.kv_store import Layers, SlotBatch, cache_layers, common_prefix, make_cache
from bot.engine.local.output import Outbox, RequestStream, Row
from bot.engine.local.sampling import pick_tokens
from bot.engine.local.session_cache import MIN_SHARED_TOKENS, SessionKVCache
from bot.errors import ModelOutOfMemoryError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from bot.engine.local.compiled import CompiledSteps

log = logging.getLogger(__name__)

# Decode steps run in chunks after an out-of-memory; after this many good steps, chunks twice as big are tried.
GROW_CHUNK_AFTER = 32

# Longer first prompts are not kept as shared prefixes: copying them costs more than the few that share them save.
MAX_SHARED_PROMPT = 1024


class ModelRunner:
    """Owns the running batch and its cache; called from the engine's worker thread only.

    `stats` is the work done so far (cached_sessions and cache_bytes are the engine's to add). It is replaced, never
    changed, so another thread reads a consistent copy. Prefills and steps are counted before their forward call
    and tokens before their text is handed over, so a reader never sees output that is not counted yet.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        eos_ids: frozenset[int],
        pad_id: int,
        sessions: SessionKVCache,
        compiled: CompiledSteps | None = None,
    ) -> None:
        """`compiled`: the steps compiled (compiled.py), tried before the eager ones."""
        self._model = model
        self._compiled = compiled
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._pad_id = pad_id
        self.sessions = sessions
        self.rows: list[Row] = []
        self._batch: SlotBatch | None = None
        self.stats = EngineStats()
        self._outbox = Outbox()
        self._chunk: int | None = None  # most rows per decode forward since an out-of-memory; None: all
        self._good_steps = 0

    @property
    def _device(self) -> torch.device:
        return self._model.device

    def admit(self, streams: Sequence[RequestStream]) -> list[Row]:
        """Prefill the joining requests in one forward call, take their first tokens, add them to the batch."""
        rows = [Row(stream, self._tokenizer, self._eos_ids, self._outbox) for stream in streams]
        self.stats = dataclasses.replace(self.stats, requests=self.stats.requests + len(rows))
        try:
            self._admit_split(rows)
            self.retire()
            return rows
        finally:
            self._outbox.flush()

    def step(self) -> None:
        """One decode token for every running row."""
        try:
            self._step()
        finally:
            self._outbox.flush()

    def _admit_split(self, rows: list[Row]) -> None:
        try:
            self._admit(rows)
            return
        except torch.OutOfMemoryError:
            pass  # retried below, once the exception and the tensors its traceback holds are gone
        free_cached_memory()
        if len(rows) == 1:
            log.warning("prefill of %d tokens ran out of memory alone", len(rows[0].prompt))
            rows[0].fail(ModelOutOfMemoryError("out of memory in a prefill of one row"))
            return
        half = len(rows) // 2
        log.warning("prefill of %d rows ran out of memory; trying %d and %d", len(rows), half, len(rows) - half)
        self._admit_split(rows[:half])
        self._admit_split(rows[half:])

    def _admit(self, rows: list[Row]) -> None:
        """Prefill `rows` and add them to the batch; on out-of-memory, leave batch and session caches as they were."""
        prompts = [row.prompt for row in rows]
        sharing = self.sessions.budget_bytes > 0
        if sharing:
            self._prefill_common_prefix(rows)
        fresh = [self.sessions.owned(row.request.session_id, row.prompt) == 0 for row in rows]
        prefixes = [self.sessions.take(row.request.session_id, row.prompt) for row in rows]
        try:
            joining, logits = self._prefill(rows, prefixes)
        except torch.OutOfMemoryError:
            # Hand the taken prefixes back, so that the halves tried next reuse them.
            for row, prefix in zip(rows, prefixes, strict=True):
                if prefix is not None and row.request.session_id is not None:
                    n = prefix[0][0].shape[-2]
                    self.sessions.put(row.request.session_id, row.prompt[:n], prefix)
            raise
        for i, (is_fresh, prompt) in enumerate(zip(fresh, prompts, strict=True)):
            # A conversation's first prompt starts like many others (system prompt, template): let them reuse it.
            if sharing and is_fresh and len(prompt) <= MAX_SHARED_PROMPT:
                self.sessions.share(prompt, joining.row_layers(i))
        self.rows.extend(rows)
        for row, prompt in zip(rows, prompts, strict=True):
            row.fed = list(prompt)
        self._accept(logits, rows)

    def _prefill(self, rows: Sequence[Row], prefixes: Sequence[Layers | None]) -> tuple[SlotBatch, torch.Tensor]:
        """One forward over the joining rows, added to the batch; the batch they were prefilled in and their logits.

        The rows are prefilled in a SlotBatch of their own, their cached prefixes copied in once and the new tokens
        written in place: that batch becomes the running one when none runs (a lone long turn copies its history
        once, not through a stacked prefix, a DynamicCache and the batch's buffers)."""
        prompts = [row.prompt for row in rows]
        cached = [0 if p is None else p[0][0].shape[-2] for p in prefixes]
        news = [prompt[n:] for prompt, n in zip(prompts, cached, strict=True)]
        width = max(len(new) for new in news)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        new_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (new, n) in enumerate(zip(news, cached, strict=True)):
            # Right-aligned, so every row's last real token is the last column and its logits are the last ones.
            input_ids[i, width - len(new) :] = torch.tensor(new, dtype=torch.long)
            positions[i, width - len(new) :] = torch.arange(n, n + len(new))
            new_mask[i, width - len(new) :] = 1
        joining = SlotBatch.for_model(self._model.config, self._model.dtype, self._device)
        # A compiled prefill's graph takes more slots than new tokens (torch guards on the two sizes differing): with
        # no cached prefix, one empty slot before the new tokens.
        lead = 1 if max(cached) == 0 and self._compiled is not None and self._compiled.compiles_prefill else 0
        # Room for the decode steps too, so a batch that runs alone does not grow (and copy) while it decodes.
        decode = max(row.request.sampling.max_new_tokens for row in rows)
        # And one spare: a compiled step keeps one (SlotBatch.step_mask).
        joining.reserve(len(rows), lead + max(cached) + width + 1 + (decode if self._batch is None else 0))
        joining.add(prefixes)
        joining.skip(lead)
        mask = joining.prefill_mask(new_mask.to(self._device))
        s = self.stats
        self.stats = dataclasses.replace(
            s,
            batches=s.batches + 1,
            largest_batch=max(s.largest_batch, len(self.rows) + len(rows)),
            prefilled_tokens=s.prefilled_tokens + sum(len(new) for new in news),
            reused_tokens=s.reused_tokens + sum(cached),
        )
        logits = None
        if self._compiled is not None:
            logits = self._compiled.prefill(input_ids, positions, mask, joining)
        if logits is None:
            logits = self._forward(input_ids, positions, mask, joining.cache)
        joining.advance(width)
        if self._batch is None:
            self._batch = joining
        else:
            # The last thing that may run out of memory: it grows the batch's buffers.
            self._batch.add([joining.row_layers(i) for i in range(len(rows))])
        return joining, logits

    def _prefill_common_prefix(self, rows: Sequence[Row]) -> None:
        """Prefill once the head that several joining prompts share and no cache holds yet, as a shared prefix."""
        if len(rows) < 2:
            return
        prompts = [row.prompt for row in rows]
        common = min(len(p) for p in prompts) - 1
        for prompt in prompts[1:]:
            common = min(common, common_prefix(prompts[0], prompt))
        if common < MIN_SHARED_TOKENS:
            return
        needing = sum(self.sessions.reusable(r.request.session_id, r.prompt) < common for r in rows)
        if needing < 2:
            return
        head = prompts[0][:common]
        cache = make_cache(self._model.config)
        self.stats = dataclasses.replace(self.stats, prefilled_tokens=self.stats.prefilled_tokens + common)
        self._forward(
            torch.tensor([head], dtype=torch.long),
            torch.arange(common).unsqueeze(0),
            torch.ones((1, common), dtype=torch.long, device=self._device),
            cache,
        )
        self.sessions.share(head, cache_layers(cache))

    def _step(self) -> None:
        self.retire()
        batch = self._batch
        if batch is None or not self.rows:
            return
        rows = self.rows
        input_ids = torch.tensor([[row.next_token] for row in rows], dtype=torch.long)
        positions = torch.tensor([[len(row.fed)] for row in rows], dtype=torch.long)
        mask = batch.step_mask(spare=1 if self._compiled is not None and self._compiled.enabled else 0)
        self.stats = dataclasses.replace(self.stats, steps=self.stats.steps + 1)
        chunk = self._chunk or len(rows)
        pieces: list[tuple[int, torch.Tensor]] = []
        for lo in range(0, len(rows), chunk):
            pieces += self._decode(batch, input_ids, positions, mask, lo, min(lo + chunk, len(rows)))
        # Every row's slot was written, or belongs to a row that fails now and whose cache is not kept.
        batch.advance(1)
        for row in rows:
            row.fed.append(row.next_token)
        done = {i for lo, logits in pieces for i in range(lo, lo + logits.shape[0])}
        for i, row in enumerate(rows):
            if i not in done:
                row.fail(ModelOutOfMemoryError("out of memory in a decode step of one row"))
        if pieces:
            self._accept(torch.cat([logits for _, logits in pieces]), [rows[i] for i in sorted(done)])
        self._note_good_step(len(rows))
        self.retire()

    def _decode(
        self,
        batch: SlotBatch,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        lo: int,
        hi: int,
    ) -> list[tuple[int, torch.Tensor]]:
        """Logits of rows [lo, hi) as (first row, logits) pieces in row order; a row out of memory alone is left out."""
        try:
            logits = None
            if self._compiled is not None:
                logits = self._compiled.decode(input_ids[lo:hi], positions[lo:hi], mask[lo:hi], batch, lo, hi)
            if logits is None:
                logits = self._forward(input_ids[lo:hi], positions[lo:hi], mask[lo:hi], batch.select(lo, hi))
            return [(lo, logits)]
        except torch.OutOfMemoryError:
            pass  # retried below, once the exception and the tensors its traceback holds are gone
        free_cached_memory()
        if hi - lo == 1:
            log.warning("decode step ran out of memory for one row of %d slots", mask.shape[-1])
            return []
        mid = (lo + hi) // 2
        self._chunk = min(self._chunk or hi - lo, hi - mid)
        self._good_steps = 0
        log.warning("decode step of %d rows ran out of memory; running at most %d at a time", hi - lo, self._chunk)
        return self._decode(batch, input_ids, positions, mask, lo, mid) + self._decode(
            batch, input_ids, positions, mask, mid, hi
        )

    def _note_good_step(self, rows: int) -> None:
        if self._chunk is None:
            return
        self._good_steps += 1
        if self._good_steps >= GROW_CHUNK_AFTER:
            # The memory may have been another process's, or taken by rows that have left since: try bigger calls.
            self._chunk = None if 2 * self._chunk >= rows else 2 * self._chunk
            self._good_steps = 0

    def retire(self) -> None:
        """Take finished and abandoned rows out of the batch, keeping their caches for their sessions' next turns."""
        batch = self._batch
        if batch is None or not any(row.leaving for row in self.rows):
            return
        # From the end, so the row swapped into a freed place is one already looked at (and staying).
        for i in range(len(self.rows) - 1, -1, -1):
            row = self.rows[i]
            if not row.leaving:
                continue
            if row.request.session_id is not None and self.sessions.budget_bytes > 0 and not row.failed:
                self.sessions.put(row.request.session_id, row.fed, batch.row_layers(i))
            batch.remove(i)
            self.rows[i] = self.rows[-1]
            self.rows.pop()
            row.stream.finish(outbox=self._outbox)
        if not self.rows:
            self._batch, self._chunk = None, None

    def drop_all(self) -> list[Row]:
        """Forget the running batch (after a failed step); the caller settles the rows' streams."""
        rows, self.rows, self._batch, self._chunk = self.rows, [], None, None
        return rows

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: object
    ) -> torch.Tensor:
        with torch.inference_mode():
            out = self._model(
                input_ids=input_ids.to(self._device),
                attention_mask=mask,
                position_ids=positions.to(self._device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        logits: torch.Tensor = out.logits
        return logits[:, -1, :]

    def _accept(self, logits: torch.Tensor, rows: Sequence[Row]) -> None:
        tokens = pick_tokens(
            logits,
            [row.request.sampling for row in rows],
            [row.fed for row in rows],
            [len(row.prompt) for row in rows],
            self._eos_ids,
        )
        streamed = sum(row.accept(token) for row, token in zip(rows, tokens, strict=True))
        self.stats = dataclasses.replace(self.stats, tokens_generated=self.stats.tokens_generated + streamed)


def free_cached_memory() -> None:
    """Give the CUDA allocator's cached blocks back before retrying after an out-of-memory."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
