"""The step loop's model work: requests join the running batch between decode steps and leave it when done.

Why our own scheduler over `model(...)` calls instead of transformers' continuous batching (`generate_batch`,
`init_continuous_batching`) as of transformers 5.24:
- its manager applies one GenerationConfig to every request; ours samples each row with its own parameters;
- its paged cache lives and dies with the manager's requests (block sharing only spans requests in flight), while a
  chat turn should start from the previous turn's cache, checked token by token;
- on this project's CPU it measured ~4.0x one-by-one against ~4.7x for a static left-padded batch (paged attention
  on the CPU is slower than sdpa over a dense cache), and we must not lose to the static batch.
So a step here is one forward call over a dense DynamicCache: a prefill of the requests that join (their reused
session prefixes stacked in), or one decode token for every running row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bot.engine.kv_cache import BatchKV, SessionKVCache, make_cache, stack_prefixes
from bot.engine.sampler import pick_tokens
from bot.engine.streams import DeltaText, RequestStream

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class Row:
    """One request in the running batch: the tokens fed to the model so far and what it generated."""

    def __init__(self, stream: RequestStream, tokenizer: PreTrainedTokenizerBase, eos_ids: frozenset[int]) -> None:
        self.stream = stream
        self.request = stream.request
        self.fed: list[int] = []
        self.generated = 0
        self.next_token = -1
        self.done = False
        self._eos_ids = eos_ids
        self._text = DeltaText(stream, tokenizer)

    @property
    def leaving(self) -> bool:
        return self.done or self.stream.cancelled

    def accept(self, token: int) -> None:
        """Take the model's next token: stream it, or end the row on EOS or at its max_new_tokens."""
        if self.stream.cancelled:
            self.done = True
            return
        if token in self._eos_ids:
            self.complete()
            return
        self.generated += 1
        self._text.add(token)
        if self.generated >= self.request.sampling.max_new_tokens:
            self.complete()
        else:
            self.next_token = token

    def complete(self) -> None:
        # The stream itself ends in retire(), once the row's cache is stored: a consumer that saw its answer end
        # finds its session's cache in place for the next turn.
        if not self.done:
            self.done = True
            self._text.flush()


@dataclass
class StepCounters:
    """Work done so far; counted before each forward call, so a reader never sees a step's output before it."""

    prefills: int = 0
    requests: int = 0
    largest_batch: int = 0
    steps: int = 0
    prefilled_tokens: int = 0
    reused_tokens: int = 0


class StepScheduler:
    """Owns the running batch and its cache; called from the engine's worker thread only."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        eos_ids: frozenset[int],
        pad_id: int,
        sessions: SessionKVCache,
        counters: StepCounters,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._pad_id = pad_id
        self.sessions = sessions
        self.rows: list[Row] = []
        self._batch: BatchKV | None = None
        self.counters = counters

    @property
    def _device(self) -> torch.device:
        return self._model.device

    def admit(self, streams: Sequence[RequestStream]) -> list[Row]:
        """Prefill the joining requests in one forward call, take their first tokens, add them to the batch."""
        rows = [Row(stream, self._tokenizer, self._eos_ids) for stream in streams]
        prompts = [row.request.prompt_ids for row in rows]
        prefixes = [self.sessions.take(row.request.session_id, row.request.prompt_ids) for row in rows]
        prior, prior_mask = stack_prefixes(prefixes, self._device)
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
        mask = torch.cat([prior_mask, new_mask.to(self._device)], dim=1)
        cache = make_cache(self._model.config, prior)
        c = self.counters
        c.prefills += 1
        c.requests += len(rows)
        c.largest_batch = max(c.largest_batch, len(self.rows) + len(rows))
        c.prefilled_tokens += sum(len(new) for new in news)
        c.reused_tokens += sum(cached)
        logits = self._forward(input_ids, positions, mask, cache)
        group = BatchKV(cache, mask)
        self._batch = group if self._batch is None else self._batch.merge(group, self._model.config)
        self.rows.extend(rows)
        for row, prompt in zip(rows, prompts, strict=True):
            row.fed = list(prompt)
        self._accept(logits, rows)
        self.retire()
        return rows

    def step(self) -> None:
        """One decode token for every running row."""
        self.retire()
        if self._batch is None:
            return
        rows = self.rows
        input_ids = torch.tensor([[row.next_token] for row in rows], dtype=torch.long)
        positions = torch.tensor([[len(row.fed)] for row in rows], dtype=torch.long)
        batch = self._batch
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(rows), 1))], dim=1)
        self.counters.steps += 1
        logits = self._forward(input_ids, positions, mask, batch.cache)
        batch.mask = mask
        for row in rows:
            row.fed.append(row.next_token)
        self._accept(logits, rows)
        self.retire()

    def retire(self) -> None:
        """Take finished and abandoned rows out of the batch, keeping their caches for their sessions' next turns."""
        if self._batch is None or not any(row.leaving for row in self.rows):
            return
        keep: list[int] = []
        for i, row in enumerate(self.rows):
            if not row.leaving:
                keep.append(i)
                continue
            if row.request.session_id is not None and self.sessions.budget_bytes > 0:
                self.sessions.put(row.request.session_id, row.fed, self._batch.row_layers(i))
            row.stream.finish()
        self.rows = [self.rows[i] for i in keep]
        self._batch = self._batch.keep(keep, self._model.config)

    def drop_all(self) -> list[Row]:
        """Forget the running batch (after a failed step); the caller settles the rows' streams."""
        rows, self.rows, self._batch = self.rows, [], None
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
        return out.logits[:, -1, :]

    def _accept(self, logits: torch.Tensor, rows: Sequence[Row]) -> None:
        tokens = pick_tokens(logits, [row.request.sampling for row in rows], [row.fed for row in rows])
        for row, token in zip(rows, tokens, strict=True):
            row.accept(token)
