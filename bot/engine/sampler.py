"""Next-token choice per row, each row with its own sampling parameters (what generate() does for a whole batch)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from bot.engine.base import SamplingParams


def _processors(sampling: SamplingParams) -> LogitsProcessorList:
    # The same processors, in the same order, as generate() builds from a GenerationConfig.
    chain = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if not sampling.greedy:
        chain.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_p < 1.0:
            chain.append(TopPLogitsWarper(sampling.top_p))
    return chain


def pick_tokens(
    logits: torch.Tensor, samplings: Sequence[SamplingParams], contexts: Sequence[Sequence[int]]
) -> list[int]:
    """One token per row of `logits` [rows, vocab]; `contexts` are the rows' tokens so far (for the penalty)."""
    logits = logits.float()
    if all(s.greedy and s.repetition_penalty == 1.0 for s in samplings):
        return logits.argmax(-1).tolist()
    picked: list[int] = []
    for row, (sampling, context) in enumerate(zip(samplings, contexts, strict=True)):
        scores = logits[row : row + 1]
        chain = _processors(sampling)
        if chain:
            ids = torch.tensor([list(context)], dtype=torch.long, device=scores.device)
            scores = chain(ids, scores)
        if sampling.greedy:
            picked.append(int(scores.argmax(-1)))
        else:
            probs = torch.softmax(scores, dim=-1)
            picked.append(int(torch.multinomial(probs, 1)))
    return picked
