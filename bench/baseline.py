"""The baseline: what the Gradio app did, `pipeline("text-generation")` once per message, one after another."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class BaselineAnswer:
    text: str
    tokens: int
    seconds: float


class Baseline:
    """Re-encodes the whole conversation on every message; no batching, no cache kept between messages."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        from transformers import pipeline

        self._tokenizer = tokenizer
        self._pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)

    def answer(self, prompt_ids: Sequence[int], max_new_tokens: int, min_new_tokens: int = 0) -> BaselineAnswer:
        # The same prompt the engine gets, as the text the app would have handed the pipeline.
        text = self._tokenizer.decode(prompt_ids, skip_special_tokens=False)
        start = time.perf_counter()
        out: Any = self._pipe(
            text,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            return_full_text=False,
            add_special_tokens=False,
        )
        seconds = time.perf_counter() - start
        answer = out[0]["generated_text"]
        return BaselineAnswer(answer, len(self._tokenizer.encode(answer, add_special_tokens=False)), seconds)
