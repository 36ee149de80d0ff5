"""`[model] quantization = "int8"` (issue 14): torchao's int8 weight-only layers on the CPU, loaded the way the bot
loads them. What it does to the answers across the benchmark's prompts is measured by `python -m bench
--quantization int8` (same greedy answers as float32, or how many differ); here, that the weights are int8, that
they take a fraction of the bytes, and that SmolLM2 still answers what float32 answers where it is sure."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from bot.config import ModelSettings, settings_from_mapping
from bot.engine import GenerationRequest, LocalEngine, SamplingParams, TokenPrompt
from bot.errors import ConfigError
from bot.render import ChatTemplateFormat

QUESTIONS = ("What is the capital of France?", "What is 2 + 2?")


def settings(folder: Path, quantization: str) -> ModelSettings:
    return ModelSettings(name=str(folder), dtype="float32", device_map="cpu", quantization=quantization)  # type: ignore[arg-type]


async def answers(folder: Path, quantization: str) -> tuple[list[str], Any]:
    """Greedy answers to QUESTIONS, and the weight of one linear layer."""
    fmt = ChatTemplateFormat(AutoTokenizer.from_pretrained(folder))
    async with LocalEngine(settings(folder, quantization)) as engine:
        texts = []
        for question in QUESTIONS:
            request = GenerationRequest(TokenPrompt(tuple(fmt.encode(None, [], question))), SamplingParams(12))
            texts.append("".join([d async for d in engine.generate(request)]))
        return texts, engine.model.model.layers[0].mlp.up_proj.weight


async def test_int8_weights_read_fewer_bytes_and_answer_what_float32_answers(
    smollm2_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bot.engine.local.loading"):
        int8, quantized = await answers(smollm2_dir, "int8")
    full, plain = await answers(smollm2_dir, "none")
    # A quarter of the bytes: int8 values, one float scale per output row.
    assert plain.dtype == torch.float32 and type(plain) is torch.nn.Parameter
    assert quantized.qdata.dtype == torch.int8 and quantized.qdata.shape == plain.shape
    assert quantized.scale.numel() == plain.shape[0]
    assert "Paris" in full[0] and "Paris" in int8[0]
    assert "4" in full[1] and "4" in int8[1]
    # With float32 activations and no compiled step, int8 is no faster: the operator is told what makes it so.
    assert any('dtype = "bfloat16"' in r.getMessage() for r in caplog.records)


def test_int8_is_a_quantization_setting() -> None:
    assert settings_from_mapping({"model": {"quantization": "int8"}}).model.quantization == "int8"
    with pytest.raises(ConfigError, match=r"model\.quantization"):
        settings_from_mapping({"model": {"quantization": "int4"}})
