"""Next-token choice per row, each row with its own sampling parameters (what generate() does for a whole batch)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from transformers.generation import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from bot.engine.base import SamplingParams


def _processors(
    sampling: SamplingParams, prompt_length: int, generated: int, eos_ids: frozenset[int]
) -> LogitsProcessorList:
    # The same processors, in the same order, as generate() builds from a GenerationConfig.
    chain = LogitsProcessorList()
    if generated < sampling.min_new_tokens and eos_ids:
        chain.append(MinNewTokensLengthLogitsProcessor(prompt_length, sampling.min_new_tokens, sorted(eos_ids)))
    if sampling.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if not sampling.greedy:
        chain.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_p < 1.0:
            chain.append(TopPLogitsWarper(sampling.top_p))
    return chain


def pick_tokens(
    logits: torch.Tensor,
    samplings: Sequence[SamplingParams],
    contexts: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    eos_ids: frozenset[int],
) -> list[int]:
    """One token per row of `logits` [rows, vocab]; `contexts` are the rows' tokens so far (prompt and answer, for
    the penalty), the first `prompt_lengths` of them their prompts."""
    logits = logits.float()
    generated = [len(context) - n for context, n in zip(contexts, prompt_lengths, strict=True)]
    plain = all(
        s.greedy and s.repetition_penalty == 1.0 and g >= s.min_new_tokens
        for s, g in zip(samplings, generated, strict=True)
    )
    if plain:
        return logits.argmax(-1).tolist()
    picked: list[int] = []
    for row, (sampling, context) in enumerate(zip(samplings, contexts, strict=True)):
        scores = logits[row : row + 1]
        chain = _processors(sampling, prompt_lengths[row], generated[row], eos_ids)
        if chain:
            ids = torch.tensor([list(context)], dtype=torch.long, device=scores.device)
            # transformers annotates input_ids as the legacy torch.LongTensor, which torch.tensor() is never typed as.
            scores = chain(cast(torch.LongTensor, ids), scores)
        if sampling.greedy:
            picked.append(int(scores.argmax(-1)))
        else:
            probs = torch.softmax(scores, dim=-1)
            picked.append(int(torch.multinomial(probs, 1)))
    return picked
