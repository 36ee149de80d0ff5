"""Grouped-query attention on the CPU (loading.use_grouped_attention): torch's attention reads each key and value
head once for the query heads that share it, instead of transformers copying them per query head first. The
switch must not change what the model computes, eagerly (prefill and decode, padded rows) or compiled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from model_fixtures import build_tiny_llama
from test_compiled_decode import check_same_answers
from transformers import AutoModelForCausalLM

from bot.engine.local import compiled

SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"


@pytest.fixture(scope="module")
def grouped_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("grouped-llama"), key_value_heads=2)


def logits_of_a_padded_batch_and_its_next_steps(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """A left-padded prefill of two rows, then three decode steps on its cache."""
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    for _ in range(3):
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        logits.append(out.logits)
    return logits


def test_grouped_attention_computes_what_copied_keys_and_values_compute(
    grouped_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = AutoModelForCausalLM.from_pretrained(grouped_llama_dir, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = torch.randint(100, 30000, (2, 9), generator=torch.Generator().manual_seed(7))
    results = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(SWITCH, switch)
        with torch.inference_mode():
            results[switch] = logits_of_a_padded_batch_and_its_next_steps(model, ids)
    for copied, grouped in zip(results["0"], results["1"], strict=True):
        torch.testing.assert_close(grouped, copied, rtol=1e-5, atol=1e-4)
        assert torch.equal(grouped[:, -1].argmax(-1), copied[:, -1].argmax(-1))


async def test_loading_on_the_cpu_turns_grouped_attention_on(
    grouped_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """And compiled decode and prefill steps of a grouped model give the eager answers token for token (untuned, as
    in test_compiled_decode's quick test)."""
    monkeypatch.delenv(SWITCH, raising=False)
    monkeypatch.setattr(compiled, "INDUCTOR_OPTIONS", {"cpp_wrapper": True})
    await check_same_answers(grouped_llama_dir, caplog, "all")
    assert os.environ.get(SWITCH) == "1"
