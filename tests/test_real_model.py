"""LocalEngine on the real SmolLM2-135M-Instruct (converted once from PyPI's GGUF into the cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import ModelSettings
from bot.engine import GenerationRequest, LocalEngine, SamplingParams, TokenPrompt

pytestmark = pytest.mark.real_model


async def test_smollm2_knows_the_capital_of_france(smollm2_dir: Path) -> None:
    settings = ModelSettings(name=str(smollm2_dir), dtype="float32", device_map="cpu", max_new_tokens=32)
    async with LocalEngine(settings) as engine:
        prompt = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        request = GenerationRequest(
            TokenPrompt(tuple(prompt)), sampling=SamplingParams(max_new_tokens=settings.max_new_tokens)
        )
        deltas = [delta async for delta in engine.generate(request)]

    answer = "".join(deltas)
    assert "Paris" in answer
    assert len(deltas) > 1
    assert "<|im_end|>" not in answer
